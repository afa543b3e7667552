/**
 * `deno task start`: configuration from the environment, start-up checks,
 * then the server until SIGINT or SIGTERM.
 * @module
 */

import { loadConfig } from "./config.ts";
import { preflight } from "./postgres/preflight.ts";
import { startServer } from "./server.ts";
import { errorMessage, log } from "./observability/log.ts";
import { EXIT_CONFIG, EXIT_DATABASE } from "./exit_codes.ts";
import { missingPermissions } from "./permissions.ts";
import { reportStartup } from "./startup_report.ts";

export { EXIT_CONFIG, EXIT_DATABASE } from "./exit_codes.ts";

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
  log.configure(config.log);
  const missing = missingPermissions(config.database);
  if (missing.length > 0) {
    // A binary compiled for other settings: its permissions are fixed when it is compiled.
    log.error(
      "startup.failed",
      `pgdeltastream cannot start: the settings name paths it may not use (${
        missing.join(", ")
      }); start it with deno task start, or compile it again with these settings (deno task compile)`,
    );
    return EXIT_CONFIG;
  }
  const { problems, warnings } = await preflight(config.database);
  if (problems.length > 0) {
    log.error(
      "startup.failed",
      `pgdeltastream cannot start:\n${problems.map((p) => `  - ${p}`).join("\n")}`,
    );
    return EXIT_DATABASE;
  }
  for (const warning of warnings) log.warn("startup.warning", `warning: ${warning}`);
  let server;
  try {
    server = await startServer(config);
  } catch (error) {
    log.error("startup.failed", `pgdeltastream cannot start: ${errorMessage(error)}`);
    return EXIT_DATABASE;
  }
  await reportStartup(server, config);
  const signal = await stop.promise;
  log.info("shutdown", `${signal}, shutting down`);
  // A shutdown taking over 5 s exits anyway: slots are kept and acks were already sent, so nothing is lost.
  const deadline = setTimeout(() => Deno.exit(0), 5000);
  await server[Symbol.asyncDispose]();
  clearTimeout(deadline);
  return 0;
}

if (import.meta.main) Deno.exit(await main());
