/**
 * Routes as a table of path → method → handler on Hono, so that a known
 * path asked with another method is a 405 naming the methods it has (Hono
 * alone would answer 404), and the JSON responses every route writes.
 * @module
 */

import type { Context, Hono } from "hono";
import { JSON_CONTENT_TYPE } from "./error_mapper.ts";
import { HttpError } from "./http_error.ts";

/** A route handler: it returns the response, or throws for the error mapper. */
export type Handler = (c: Context) => Response | Promise<Response>;

/** Registers paths with the methods each answers. */
export class Routes<T extends Hono> {
  readonly #app: T;

  /** Adds routes to `app`. */
  constructor(app: T) {
    this.#app = app;
  }

  /** Answers `methods` on `path`; any other method gets a 405 with `Allow`. */
  add(path: string, methods: Record<string, Handler>): void {
    for (const [method, handler] of Object.entries(methods)) {
      this.#app.on(method, path, (c) => handler(c));
    }
    const allow = Object.keys(methods).join(", ");
    this.#app.all(path, (c) => {
      throw new HttpError(405, `Method ${c.req.method} is not allowed here; use ${allow}`, {
        allow,
      });
    });
  }
}

/** A JSON response: `body` serialized, or sent as is when `raw` (already JSON text). */
export function json(body: unknown, status = 200, raw = false): Response {
  return new Response(raw ? body as string : JSON.stringify(body), {
    status,
    headers: { "content-type": JSON_CONTENT_TYPE },
  });
}

/** A streamed NDJSON response. */
export function ndjson(body: ReadableStream<Uint8Array>): Response {
  return new Response(body, { headers: { "content-type": "application/x-ndjson; charset=utf-8" } });
}
