/**
 * `deno task dev`: a real PostgreSQL (embedded, `wal_level=logical`, data in
 * `.data/postgres`) and the server on it. Ctrl-C stops both.
 * @module
 */

import { loadConfig } from "./config.ts";
import { EmbeddedPostgres } from "./embedded_postgres.ts";
import { preflight } from "./preflight.ts";
import { startServer } from "./server.ts";

const DEV_PG_PORT = 54329;

if (import.meta.main) {
  const dataDir = `${Deno.cwd()}/.data/postgres`;
  console.log(`Starting PostgreSQL (data in ${dataDir}) ...`);
  const postgres = await EmbeddedPostgres.start({
    dataDir,
    port: Number(Deno.env.get("DEV_PG_PORT") ?? DEV_PG_PORT),
  });
  const env = (name: string) => Deno.env.get(name);
  const config = loadConfig(env);
  config.database = postgres.database;
  const problems = await preflight(config.database);
  if (problems.length > 0) {
    console.error(problems.join("\n"));
    await postgres.stop();
    Deno.exit(1);
  }
  const server = await startServer(config);
  const base = server.url.href.replace(/\/$/, "");
  console.log(`
pgdeltastream is running.
  psql:      psql ${postgres.url}
  init:      curl ${base}/v1/init
  snapshot:  curl -X POST ${base}/v1/snapshot/data -H 'content-type: application/json' \\
               -d '{"slotName": "<slotName>", "table": "<table>", "offset": 0, "limit": 5}'
  stream:    ${base.replace(/^http/, "ws")}/v1/lr/stream?slotName=<slotName>
  health:    curl ${base}/healthz
Press Ctrl-C to stop both.`);
  const stop = Promise.withResolvers<void>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop.resolve());
  }
  await stop.promise;
  console.log("Stopping ...");
  await server[Symbol.asyncDispose]();
  await postgres.stop();
  Deno.exit(0);
}
