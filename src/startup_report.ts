/**
 * What the server says once it has started: slots left from earlier runs,
 * retained WAL, whether slots survive a failover, authentication, metrics
 * and the address. `deno task start` and `deno task dev` log the same lines.
 * @module
 */

import { type AuthConfig, type Config, describeDatabase } from "./config.ts";
import { log } from "./observability/log.ts";
import type { RunningServer } from "./server.ts";

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

/** Logs the `startup.*` lines of a server that has just started. */
export async function reportStartup(server: RunningServer, config: Config): Promise<void> {
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
}
