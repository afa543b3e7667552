/**
 * Who may call what, decided at the edge before any database work or
 * websocket upgrade, per route:
 *
 * - **Origins.** A request whose `Origin` names another site than the
 *   server's own or one of `CORS_ORIGINS` is refused (403) when it changes
 *   state (any method but GET, and the seed's GET /v1/init) or upgrades to a
 *   websocket, whatever the mode; allowed origins get CORS headers and
 *   preflight answers.
 * - **Protected mode** (no credentials configured): only clients on this
 *   machine are served, as admins; anyone else gets 403 naming the
 *   variables to set. The `Host` must name this machine too, so that a page
 *   whose domain was rebound to 127.0.0.1 cannot call in.
 * - **AUTH=none**: everyone is an admin.
 * - **Otherwise**: a bearer credential (header; for websockets also the
 *   `access_token` query parameter) is checked: 401 if missing or invalid,
 *   403 if valid but not granted.
 * @module
 */

import type { Context, MiddlewareHandler } from "hono";
import type { Authenticator } from "../auth/authenticator.ts";
import { mayRead, type Principal } from "../auth/principal.ts";
import type { AuthConfig } from "../config.ts";
import { ForbiddenError, UnauthorizedError } from "../errors.ts";
import { errorBody } from "./error_mapper.ts";
import { log } from "../observability/log.ts";

/**
 * What a route needs: nothing; any valid credential; an admin; the right
 * to read the stream named in its path; or an admin or `METRICS_TOKEN`.
 */
export type Access = "public" | "authenticated" | "admin" | "stream" | "metrics";

/** How a route is guarded. */
export interface Guard {
  access: Access;
  /** A GET that changes state (the seed's GET /v1/init): refused cross-site, as a POST is. */
  changesState?: boolean;
}

/** Variables that turn protected mode off, for its message. */
const AUTH_VARIABLES = "ADMIN_TOKENS, JWT_SECRET or JWKS_URL (or AUTH=none on a private network)";

function isLoopbackAddress(hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, "").toLowerCase();
  return host === "::1" || /^127\./.test(host) || /^::ffff:127\./.test(host);
}

function isLoopbackName(hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, "").toLowerCase();
  return host === "localhost" || host.endsWith(".localhost") || isLoopbackAddress(host);
}

function isUpgrade(request: Request): boolean {
  return (request.headers.get("upgrade") ?? "").toLowerCase().split(",").some((t) =>
    t.trim() === "websocket"
  );
}

/** The bearer credential of a request: the Authorization header, or a websocket's `access_token`. */
function credential(request: Request): string | undefined {
  const header = request.headers.get("authorization");
  if (header !== null) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (match === null) {
      throw new UnauthorizedError(
        'Invalid credential: the Authorization header must be "Bearer <token>"',
      );
    }
    return match[1];
  }
  if (isUpgrade(request)) {
    return new URL(request.url).searchParams.get("access_token") ?? undefined;
  }
  return undefined;
}

/** The request's remote address (from Deno.serve's handler info), if known. */
function remoteHost(c: Context): string | undefined {
  const info = c.env as { remoteAddr?: { hostname?: string } } | undefined;
  return info?.remoteAddr?.hostname;
}

/** Decides principals and access for every route; see the module's documentation. */
export class AccessControl {
  readonly #config: AuthConfig;
  readonly #authenticator: Pick<Authenticator, "authenticate">;

  /** Guards with `config`, checking credentials with `authenticator`. */
  constructor(config: AuthConfig, authenticator: Pick<Authenticator, "authenticate">) {
    this.#config = config;
    this.#authenticator = authenticator;
  }

  /** Whether `origin` may call: the server's own origin, or one listed in CORS_ORIGINS. */
  #allowedOrigin(origin: string, request: Request): boolean {
    return origin === new URL(request.url).origin || this.#config.corsOrigins.includes(origin);
  }

  /** CORS: preflight answers for allowed origins (403 for others), and headers on their responses. */
  cors(): MiddlewareHandler {
    return async (c, next) => {
      const origin = c.req.header("origin");
      const allowed = origin !== undefined && this.#allowedOrigin(origin, c.req.raw);
      if (c.req.method === "OPTIONS" && origin !== undefined) {
        if (!allowed) {
          return errorBody(
            403,
            `Cross-site request refused: origin ${JSON.stringify(origin)} is not allowed; ` +
              "list it in CORS_ORIGINS to allow it",
          );
        }
        return new Response(null, {
          status: 204,
          headers: {
            "access-control-allow-origin": origin,
            "access-control-allow-methods": "GET, POST, PATCH, DELETE, OPTIONS",
            "access-control-allow-headers": "authorization, content-type",
            "access-control-max-age": "600",
            vary: "origin",
          },
        });
      }
      await next();
      if (allowed && origin !== new URL(c.req.url).origin) {
        c.res.headers.set("access-control-allow-origin", origin);
        c.res.headers.set("access-control-expose-headers", "www-authenticate");
        c.res.headers.append("vary", "origin");
      }
    };
  }

  /**
   * The principal of the request, checked against `guard`: throws 403 for a
   * refused origin or a client protected mode does not serve or a principal
   * not granted, 401 for a missing or invalid credential.
   */
  async check(c: Context, guard: Guard): Promise<Principal> {
    try {
      return await this.#check(c, guard);
    } catch (error) {
      if (error instanceof UnauthorizedError || error instanceof ForbiddenError) {
        // Who was refused and why; never the credential (the query string may hold one).
        log.warn("auth.refused", error.message, {
          status: error instanceof UnauthorizedError ? 401 : 403,
          method: c.req.method,
          path: new URL(c.req.url).pathname,
          remote: remoteHost(c),
        });
      }
      throw error;
    }
  }

  async #check(c: Context, guard: Guard): Promise<Principal> {
    const request = c.req.raw;
    const origin = request.headers.get("origin");
    const crossSite = origin !== null && !this.#allowedOrigin(origin, request);
    if (crossSite && (request.method !== "GET" || guard.changesState || isUpgrade(request))) {
      throw new ForbiddenError(
        `Cross-site request refused: origin ${JSON.stringify(origin)} may not ${
          isUpgrade(request) ? "open a stream" : "change state"
        } here; list it in CORS_ORIGINS to allow it`,
      );
    }
    let principal: Principal;
    switch (this.#config.mode) {
      case "none":
        principal = { kind: "admin" };
        break;
      case "protected": {
        const remote = remoteHost(c);
        const host = new URL(request.url).hostname;
        if (remote === undefined || !isLoopbackAddress(remote) || !isLoopbackName(host)) {
          throw new ForbiddenError(
            `This server has no authentication configured, so it serves clients on its own ` +
              `machine only; set ${AUTH_VARIABLES}`,
          );
        }
        principal = { kind: "admin" };
        break;
      }
      case "on": {
        // A public route does not look at credentials: a stale one does not make it fail.
        const token = guard.access === "public" ? undefined : credential(request);
        principal = token === undefined
          ? { kind: "anonymous" }
          : await this.#authenticator.authenticate(token);
      }
    }
    if (guard.access === "public") return principal;
    if (principal.kind === "anonymous") {
      throw new UnauthorizedError(
        "Missing credential: send Authorization: Bearer <token> (or ?access_token= on a websocket)",
      );
    }
    if (guard.access === "metrics") {
      if (principal.kind === "admin" || principal.kind === "scraper") return principal;
      throw new ForbiddenError("Forbidden: metrics need an admin credential or METRICS_TOKEN");
    }
    if (principal.kind === "scraper") {
      throw new ForbiddenError("Forbidden: METRICS_TOKEN may read /metrics only");
    }
    if (guard.access === "admin" && principal.kind !== "admin") {
      throw new ForbiddenError("Forbidden: this needs an admin credential");
    }
    if (guard.access === "stream") {
      const name = c.req.param("name") ?? "";
      if (!mayRead(principal, name)) {
        throw new ForbiddenError(`Forbidden: the credential does not grant stream "${name}"`);
      }
    }
    return principal;
  }
}
