/**
 * The live viewer: a page, its script and the client library, served as
 * they were built (`deno task build-assets`), from memory. The page calls
 * the API with the credential its user gives it, so these routes are open.
 * @module
 */

import type { Hono } from "hono";
import { CHARTS_JS, CLIENT_JS, ICON_SVG, INDEX_HTML, VIEWER_JS } from "../viewer/assets.ts";
import { open, type Routes } from "./routes.ts";

/** Only this origin's scripts, styles inline in the page, and calls to this server. */
const CSP = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; " +
  "connect-src 'self' ws: wss:; img-src 'self'; base-uri 'none'; form-action 'none'; " +
  "frame-ancestors 'none'";

function asset(body: string, type: string): Response {
  return new Response(body, {
    headers: {
      "content-type": `${type}; charset=utf-8`,
      "content-security-policy": CSP,
      "x-content-type-options": "nosniff",
      "cache-control": "no-cache",
    },
  });
}

/** Adds the viewer's routes. */
export function viewerRoutes(routes: Routes<Hono>): void {
  routes.add("/", { GET: open(() => asset(INDEX_HTML, "text/html")) });
  routes.add("/assets/viewer.js", { GET: open(() => asset(VIEWER_JS, "text/javascript")) });
  routes.add("/assets/charts.js", { GET: open(() => asset(CHARTS_JS, "text/javascript")) });
  // Browsers ask for /favicon.ico whatever the page says: the same icon, as SVG.
  routes.add("/favicon.ico", { GET: open(() => asset(ICON_SVG, "image/svg+xml")) });
  routes.add("/assets/pgdeltastream.js", {
    GET: open(() => asset(CLIENT_JS, "text/javascript")),
  });
}
