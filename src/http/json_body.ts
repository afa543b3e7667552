/**
 * Reading a request's JSON body: `application/json` (or `text/plain`, which
 * browsers may send without a preflight), at most {@link MAX_REQUEST_BYTES}
 * whatever `Content-Length` says, and valid JSON; then checked against its
 * request schema.
 * @module
 */

import { MAX_REQUEST_BYTES } from "../protocol.ts";
import { HttpError } from "./http_error.ts";
import { JsonNumber } from "./json_number.ts";
import { parseRequest, type RequestSchema } from "./request_schemas.ts";

function keepDigits(_key: string, value: unknown, context?: { source?: string }): unknown {
  if (typeof value !== "number" || context?.source === undefined) return value;
  return Number.isSafeInteger(value) || String(value) === context.source
    ? value
    : new JsonNumber(context.source);
}

const tooLarge = () =>
  new HttpError(413, `Invalid request: the body is larger than ${MAX_REQUEST_BYTES} bytes`);

/** The body of `request`, parsed as JSON; 400, 413 or 415 otherwise. */
export async function readJson(request: Request): Promise<unknown> {
  const type = request.headers.get("content-type") ?? "application/json";
  if (!/^application\/json\b/i.test(type) && !/^text\/plain\b/i.test(type)) {
    throw new HttpError(
      415,
      `Invalid request: content-type must be application/json, not ${JSON.stringify(type)}`,
    );
  }
  if (Number(request.headers.get("content-length") ?? 0) > MAX_REQUEST_BYTES) throw tooLarge();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of request.body ?? []) {
    size += chunk.byteLength;
    if (size > MAX_REQUEST_BYTES) throw tooLarge();
    chunks.push(chunk);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  const text = new TextDecoder().decode(bytes);
  if (text.trim() === "") return {};
  try {
    return JSON.parse(text, keepDigits);
  } catch (error) {
    throw new HttpError(
      400,
      `Invalid request: the body is not valid JSON (${(error as Error).message})`,
    );
  }
}

/** The JSON body of `request`, checked against `schema`. */
export async function readBody<T>(request: Request, schema: RequestSchema<T>): Promise<T> {
  return parseRequest(schema, await readJson(request));
}
