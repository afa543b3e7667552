/**
 * `deno task dev`: a real PostgreSQL (embedded, `wal_level=logical`, data in
 * `.data/postgres`) and the server on it. Any signal that can be caught
 * (Ctrl-C, a closed terminal, `kill`) stops both; a server left running by a
 * launcher that could not catch one (`kill -9`) is stopped at the next start.
 * @module
 */

import { loadConfig } from "../config.ts";
import {
  canReach,
  clearLeftover,
  EmbeddedPostgres,
  rootCacheDir,
  serverUser,
} from "./embedded_postgres.ts";
import { preflight } from "../postgres/preflight.ts";
import { startServer } from "../server.ts";
import { log } from "../observability/log.ts";
import { reportStartup } from "../startup_report.ts";

const DEV_PG_PORT = 54329;

/** Signals that end the launcher: each stops PostgreSQL first. */
const STOP_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"] as const;

/**
 * `.data/postgres` in the working directory; as root, when user postgres
 * cannot reach that (a checkout in a private directory), a directory of
 * root's own under /var/tmp, named after the checkout.
 */
async function dataDirectory(): Promise<string> {
  const chosen = `${Deno.cwd()}/.data/postgres`;
  const user = await serverUser();
  if (user === undefined || await canReach(chosen, user)) return chosen;
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(chosen));
  const id = [...new Uint8Array(digest).slice(0, 8)].map((b) => b.toString(16).padStart(2, "0"))
    .join("");
  return `${await rootCacheDir()}/dev-${id}/postgres`;
}

async function main(): Promise<number> {
  const stop = Promise.withResolvers<string>();
  for (const signal of STOP_SIGNALS) Deno.addSignalListener(signal, () => stop.resolve(signal));
  const dataDir = await dataDirectory();
  if (Deno.args.includes("--reset")) {
    // A fresh database: whatever a previous run left there (a PostgreSQL still running included).
    await clearLeftover(dataDir, (line) => console.log(line));
    await Deno.remove(dataDir, { recursive: true }).catch((error) => {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    });
    console.log(`Removed the dev database in ${dataDir}`);
  }
  console.log(`Starting PostgreSQL (data in ${dataDir}; deno task dev --reset starts afresh) ...`);
  let postgres: EmbeddedPostgres;
  try {
    postgres = await EmbeddedPostgres.start({
      dataDir,
      port: Number(Deno.env.get("DEV_PG_PORT") || DEV_PG_PORT),
      onLog: (line) => {
        if (/stopping PostgreSQL|removing stale/.test(line)) console.log(line);
      },
    });
  } catch (error) {
    console.error(`pgdeltastream dev: ${(error as Error).message}`);
    return 1;
  }
  let server;
  try {
    const config = loadConfig((name) => Deno.env.get(name));
    config.database = postgres.database;
    log.configure(config.log);
    const { problems, warnings } = await preflight(config.database);
    if (problems.length > 0) throw new Error(problems.join("\n"));
    for (const warning of warnings) log.warn("startup.warning", `warning: ${warning}`);
    server = await startServer(config);
    await reportStartup(server, config);
  } catch (error) {
    console.error(`pgdeltastream dev: the server cannot start: ${(error as Error).message}`);
    await postgres.stop();
    return 1;
  }
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
  const signal = await stop.promise;
  console.log(`${signal}: stopping ...`);
  await server[Symbol.asyncDispose]();
  await postgres.stop();
  return 0;
}

if (import.meta.main) Deno.exit(await main());
