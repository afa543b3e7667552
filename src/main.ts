/**
 * `deno task start`: configuration from the environment, start-up checks,
 * then the server until SIGINT or SIGTERM.
 * @module
 */

import { describeDatabase, loadConfig } from "./config.ts";
import { preflight } from "./postgres/preflight.ts";
import { startServer } from "./server.ts";

/** Exit codes: configuration error, database not ready. */
export const EXIT_CONFIG = 2;
/** The database is unreachable or not set up for logical replication. */
export const EXIT_DATABASE = 1;

/** Runs the server until a signal asks it to stop; returns the exit code. */
export async function main(): Promise<number> {
  // Listen for signals before anything else: one that arrives during start-up still stops cleanly.
  const stop = Promise.withResolvers<string>();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop.resolve(signal));
  }
  let config;
  try {
    config = loadConfig((name) => Deno.env.get(name));
  } catch (error) {
    console.error(`pgdeltastream: ${(error as Error).message}`);
    return EXIT_CONFIG;
  }
  const { problems, warnings } = await preflight(config.database);
  if (problems.length > 0) {
    console.error(`pgdeltastream cannot start:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
    return EXIT_DATABASE;
  }
  for (const warning of warnings) console.error(`pgdeltastream: warning: ${warning}`);
  let server;
  try {
    server = await startServer(config);
  } catch (error) {
    console.error(`pgdeltastream cannot start: ${(error as Error).message}`);
    return EXIT_DATABASE;
  }
  // Slots outlive the process: say which of ours exist, so none holds WAL unnoticed.
  const leftovers = await server.app.leftoverSlots().catch(() => []);
  if (leftovers.length > 0) {
    console.log(
      `pgdeltastream: slots created earlier, resumable with /v1/lr/stream: ${leftovers.join(", ")}`,
    );
  }
  console.log(
    `pgdeltastream listening on ${server.url.href} (database ${describeDatabase(config.database)})`,
  );
  const signal = await stop.promise;
  console.log(`pgdeltastream: ${signal}, shutting down`);
  // A shutdown taking over 5 s exits anyway: slots are kept and acks were already sent, so nothing is lost.
  const deadline = setTimeout(() => Deno.exit(0), 5000);
  await server[Symbol.asyncDispose]();
  clearTimeout(deadline);
  return 0;
}

if (import.meta.main) Deno.exit(await main());
