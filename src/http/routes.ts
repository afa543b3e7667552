/**
 * Routes as a table of path → method → guarded handler on Hono: each
 * handler runs only after the access control let its request through (so
 * before any database work), and a known path asked with another method is
 * a 405 naming the methods it has (Hono alone would answer 404). Also the
 * JSON responses every route writes.
 * @module
 */

import type { Context, Hono } from "hono";
import type { Principal } from "../auth/principal.ts";
import type { AccessControl, Guard } from "./access.ts";
import { JSON_CONTENT_TYPE } from "./error_mapper.ts";
import { HttpError } from "./http_error.ts";

/** A route handler: it returns the response, or throws for the error mapper. */
export type Handler = (c: Context, principal: Principal) => Response | Promise<Response>;

/** A handler and what it needs of its caller. */
export interface Route extends Guard {
  handle: Handler;
}

/** A route anyone may call (protected mode and origins still apply). */
export function open(handle: Handler): Route {
  return { access: "public", handle };
}

/** A route for any valid credential (a consumer, an admin). */
export function signedIn(handle: Handler): Route {
  return { access: "authenticated", handle };
}

/** A route for admins; `changesState` for a GET that changes state (the seed's init). */
export function admin(handle: Handler, changesState = false): Route {
  return { access: "admin", handle, changesState };
}

/** A route for admins and scrapers with `METRICS_TOKEN`. */
export function scraper(handle: Handler): Route {
  return { access: "metrics", handle };
}

/** A route for whoever may read the stream named in the path (`:name`). */
export function reader(handle: Handler): Route {
  return { access: "stream", handle };
}

/** Registers paths with the methods each answers, each behind its guard. */
export class Routes<T extends Hono> {
  readonly #app: T;
  readonly #access: AccessControl;

  /** Adds routes to `app`, guarded by `access`. */
  constructor(app: T, access: AccessControl) {
    this.#app = app;
    this.#access = access;
  }

  /** Answers `methods` on `path`; any other method gets a 405 with `Allow`. */
  add(path: string, methods: Record<string, Route>): void {
    for (const [method, route] of Object.entries(methods)) {
      this.#app.on(method, path, async (c) => route.handle(c, await this.#access.check(c, route)));
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
