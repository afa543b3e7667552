/**
 * The one place that decides the status a client sees: every error a
 * handler throws comes here and leaves as `{"error": "..."}`. Domain errors
 * map to their status; PostgreSQL being unreachable is a 503; anything else
 * is a 500 whose details stay in the server log.
 * @module
 */

import { log } from "../observability/log.ts";
import {
  ConflictError,
  ForbiddenError,
  GoneError,
  InvalidRequestError,
  NotFoundError,
  UnauthorizedError,
  UnavailableError,
} from "../errors.ts";
import { isConnectionError } from "../postgres/database.ts";
import type { ErrorBody } from "../protocol.ts";
import { HttpError } from "./http_error.ts";

/** Content type of every JSON body the server sends. */
export const JSON_CONTENT_TYPE = "application/json; charset=utf-8";

/** Domain error classes and the status each is answered with. */
const STATUSES: [new (...args: never[]) => Error, number][] = [
  [InvalidRequestError, 400],
  [ForbiddenError, 403],
  [NotFoundError, 404],
  [ConflictError, 409],
  [GoneError, 410],
  [UnavailableError, 503],
];

/** A JSON error response. */
export function errorBody(status: number, message: string, headers: HeadersInit = {}): Response {
  const body: ErrorBody = { error: message };
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": JSON_CONTENT_TYPE, ...headers },
  });
}

/** The response for `error`; logs what the client is not told. */
export function errorResponse(error: unknown): Response {
  if (error instanceof HttpError) return errorBody(error.status, error.message, error.headers);
  if (error instanceof UnauthorizedError) {
    // RFC 6750: the challenge, with the reason for a credential that was sent and refused.
    const refused = !/^Missing credential/.test(error.message);
    const challenge = refused
      ? `Bearer realm="pgdeltastream", error="invalid_token", error_description=${
        JSON.stringify(error.message.replace(/["\\]/g, "'"))
      }`
      : `Bearer realm="pgdeltastream"`;
    return errorBody(401, error.message, { "www-authenticate": challenge });
  }
  for (const [type, status] of STATUSES) {
    if (error instanceof type) return errorBody(status, error.message);
  }
  if (isConnectionError(error)) {
    return errorBody(503, `Database unavailable (${(error as Error).message}); retry shortly`);
  }
  log.error("request.failed", "a request failed", {
    error: error instanceof Error ? (error.stack ?? error.message) : String(error),
  });
  return errorBody(500, "Internal server error; see the server log");
}
