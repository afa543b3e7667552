/**
 * The HTTP edge on Hono: the routes of every API version, and the one error
 * mapper that decides each status a client sees.
 * @module
 */

import { Hono } from "hono";
import type { HttpHost } from "./host.ts";
import { errorBody, errorResponse } from "./error_mapper.ts";
import { AccessControl } from "./access.ts";
import { json, open, Routes, scraper } from "./routes.ts";
import { NotFoundError } from "../errors.ts";
import { v1Routes } from "./v1_routes.ts";
import { v2Routes } from "./v2_routes.ts";
import { viewerRoutes } from "./viewer_routes.ts";

/** The request handler of `server`'s API. */
export function createHttpApp(server: HttpHost): Hono {
  const app = new Hono();
  app.onError((error) => errorResponse(error));
  app.notFound((c) => errorBody(404, `Not found: ${new URL(c.req.url).pathname}`));
  const access = new AccessControl(server.config.auth, server.authenticator);
  const metrics = server.metrics;
  if (metrics !== undefined) {
    app.use("*", async (c, next) => {
      await next();
      // The route's pattern (`/v2/streams/:name`), never the path: labels stay few.
      const route = c.req.routePath === "*" ? "unmatched" : c.req.routePath;
      metrics.httpRequest(route, c.req.method, c.res.status);
    });
  }
  app.use("*", access.cors());
  const routes = new Routes(app, access);
  routes.add("/metrics", {
    GET: scraper(async () => {
      if (metrics === undefined) throw new NotFoundError("Metrics are off (METRICS=off)");
      return new Response(await metrics.text(), {
        headers: { "content-type": metrics.contentType },
      });
    }),
  });
  // For load balancers: up or not, nothing more (the detailed report is /v2/status, for admins).
  routes.add("/healthz", {
    GET: open(async () => {
      const { status } = await server.health();
      return json({ status: status === "ok" ? "ok" : "unavailable" }, status === "ok" ? 200 : 503);
    }),
  });
  viewerRoutes(routes);
  v1Routes(server, routes);
  v2Routes(server, routes);
  return app;
}
