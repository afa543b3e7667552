/**
 * `deno task start`: configuration from the environment, start-up checks,
 * then the server until SIGINT or SIGTERM.
 * @module
 */

import { type AuthConfig, describeDatabase, loadConfig } from "./config.ts";
import { preflight } from "./postgres/preflight.ts";
import { startServer } from "./server.ts";
import { errorMessage, log } from "./observability/log.ts";
import { EXIT_CONFIG, EXIT_DATABASE } from "./exit_codes.ts";
import { missingPermissions } from "./permissions.ts";

export { EXIT_CONFIG, EXIT_DATABASE } from "./exit_codes.ts";

/** The authentication mode in force, for the start-up log (never a secret). */
export function describeAuth(auth: AuthConfig): string {
  switch (auth.mode) {
    case "none":
      return "none (AUTH=none): every client may do everything; for private networks only";
    case "protected":
      return "protected mode: no credentials are configured, so only clients on this machine are " +
        "served; set ADMIN_TOKENS, JWT_SECRET or JWKS_URL to serve others";
    case "on": {
      const kinds = [
        auth.adminTokens.length > 0 ? `${auth.adminTokens.length} admin token(s)` : undefined,
        auth.jwtSecret !== undefined ? "HS256 JWTs (JWT_SECRET)" : undefined,
        auth.jwksUrl !== undefined
          ? `JWTs from ${new URL(auth.jwksUrl).host} (JWKS_URL)`
          : undefined,
      ].filter(Boolean);
      return `on: ${kinds.join(", ")}; audience ${JSON.stringify(auth.audience)}${
        auth.issuer ? `, issuer ${JSON.stringify(auth.issuer)}` : ""
      }; cross-origin calls from ${
        auth.corsOrigins.length > 0 ? auth.corsOrigins.join(", ") : "no other origin"
      }`;
    }
  }
}

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
  // Slots outlive the process: say which of ours exist, so none holds WAL unnoticed.
  const leftovers = await server.app.leftoverSlots().catch(() => []);
  if (leftovers.length > 0) {
    log.info(
      "startup.slots",
      `slots created earlier, resumable with /v1/lr/stream: ${leftovers.join(", ")}`,
    );
  }
  const wal = await server.app.walReport().catch(() => undefined);
  if (wal !== undefined) {
    const held = wal.lines.length > 0 ? wal.lines.join("; ") : "no stream holds WAL";
    log.info("startup.wal", `retained WAL: ${held}; max_slot_wal_keep_size = ${wal.keepSize}`, {
      maxSlotWalKeepSize: wal.keepSize,
    });
    if (wal.keepSize === "-1") {
      log.warn(
        "startup.wal",
        "max_slot_wal_keep_size is not set: if this server's WAL guard is not running, an " +
          "abandoned slot can fill the disk. Set it (e.g. ALTER SYSTEM SET " +
          "max_slot_wal_keep_size = '16GB') above the streams' STREAM_MAX_LAG_BYTES",
      );
    }
  }
  const failover = await server.app.slots.ensureFailover().catch(() => [])
    .then(async (changed) => ({ changed, ready: (await server.app.health()).failover }));
  if (failover.changed.length > 0) {
    log.info("startup.failover", `now failover slots: ${failover.changed.join(", ")}`);
  }
  if (failover.ready !== undefined) {
    if (failover.ready.ready) {
      log.info(
        "startup.failover",
        `slots survive a failover: failover slots, synchronized_standby_slots = ${
          failover.ready.synchronizedStandbySlots.join(",")
        }`,
      );
    } else {
      log.warn(
        "startup.failover",
        `slots may not survive a failover of the database: ${failover.ready.problems.join("; ")}`,
      );
    }
  }
  log.info("startup.auth", `authentication: ${describeAuth(config.auth)}`);
  log.info(
    "startup.metrics",
    config.metrics.enabled
      ? `metrics at /metrics (admins${config.metrics.token ? " and METRICS_TOKEN" : ""})`
      : "metrics are off (METRICS=off)",
  );
  log.info(
    "startup.listening",
    `pgdeltastream listening on ${server.url.href} (database ${describeDatabase(config.database)})`,
    { url: server.url.href },
  );
  const signal = await stop.promise;
  log.info("shutdown", `${signal}, shutting down`);
  // A shutdown taking over 5 s exits anyway: slots are kept and acks were already sent, so nothing is lost.
  const deadline = setTimeout(() => Deno.exit(0), 5000);
  await server[Symbol.asyncDispose]();
  clearTimeout(deadline);
  return 0;
}

if (import.meta.main) Deno.exit(await main());
