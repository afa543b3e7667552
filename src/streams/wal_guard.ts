/**
 * The WAL guard: on a timer, never in a request path, it weighs every v2
 * stream and v1 slot of the database against its limits — WAL not yet
 * acknowledged (`maxLagBytes`: the database's position minus the slot's
 * confirmed one; the slot holds that and a little more, back to its restart
 * position) and time without a consumer (`maxIdleSeconds`) — and
 * against PostgreSQL's own guard (`max_slot_wal_keep_size`, which marks a
 * slot `lost`). It logs at 50% and 80% of a limit, and at 100% (or when
 * PostgreSQL lost the slot) invalidates: the slot is dropped so the WAL is
 * released, the stream's record says why, and its consumer is told (4410).
 *
 * The idle clock is the `last_activity` column, moved to now on every check
 * while a consumer is connected (to any instance), so a restart does not
 * reset it. Several instances on one database check in turn: each check
 * runs under an advisory lock, and an instance that does not get it skips.
 * @module
 */

import type pg from "pg";
import type { Metrics } from "../observability/metrics.ts";
import { V1_STREAM_LABEL } from "../observability/metrics.ts";
import { errorMessage, log } from "../observability/log.ts";
import type { StreamLimits } from "../protocol.ts";
import type { SchemaNames } from "../postgres/server_schema.ts";
import type { SlotManager } from "../slots/slot_manager.ts";
import { lostSlotReason, slotInvalidatedReason, type StreamManager } from "./stream_manager.ts";
import type { SessionRegistry } from "./session_registry.ts";
import { CloseCode } from "../protocol.ts";
import { prettyBytes, standing } from "./wal_limits.ts";

/** What the guard acts on. */
export interface GuardDependencies {
  pool: pg.Pool;
  names: SchemaNames;
  streams: StreamManager;
  slots: SlotManager;
  sessions: SessionRegistry;
  streamLimits: StreamLimits;
  metrics?: Metrics;
}

/** One stream or v1 slot as a check sees it. */
interface Guarded {
  kind: "stream" | "v1";
  name: string;
  slot_name: string;
  limits: StreamLimits | null;
  idle: number;
  invalidated: boolean;
  exists: boolean;
  /** Its slot was made once (so one that does not exist now was lost, not still being made). */
  slot_ready: boolean;
  /** The server's address as it sees it (`host:port`), for the reason of a lost slot. */
  server: string | null;
  active: boolean;
  lag: number | null;
  retained: number | null;
  lost: string | null;
}

/**
 * `max_slot_wal_keep_size`, and the SQL of why PostgreSQL lost a slot
 * (17 adds `invalidation_reason`; before it, `wal_status = 'lost'` only).
 */
async function readSettings(
  client: pg.PoolClient,
): Promise<{ keepSize: string; lostReason: string }> {
  const { rows: [row] } = await client.query<{ size: string; version: number }>(
    `SELECT current_setting('max_slot_wal_keep_size') AS size,
            current_setting('server_version_num')::int AS version`,
  );
  return {
    keepSize: row.size,
    lostReason: row.version >= 170000
      ? "coalesce(s.invalidation_reason, CASE WHEN s.wal_status = 'lost' THEN 'wal_removed' END)"
      : "CASE WHEN s.wal_status = 'lost' THEN 'wal_removed' END",
  };
}

/** Percentages of a limit at which the guard logs a warning (once each, until it falls back). */
const WARN_AT = [0.8, 0.5];

/** Runs the checks every `intervalMs` until disposed. */
export class WalGuard implements AsyncDisposable {
  readonly #deps: GuardDependencies;
  readonly #intervalMs: number;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #running: Promise<void> = Promise.resolve();
  #stopped = false;
  /** The highest warning level logged per stream and limit, so each is logged once. */
  readonly #warned = new Map<string, number>();
  /** The database's settings the checks use, read once. */
  #settings: { keepSize: string; lostReason: string } | undefined;

  /** A guard of `deps`' streams, checking every `intervalMs`. */
  constructor(deps: GuardDependencies, intervalMs: number) {
    this.#deps = deps;
    this.#intervalMs = intervalMs;
  }

  /** Starts the timer (the first check runs after one interval). */
  start(): void {
    const next = () => {
      if (this.#stopped) return;
      this.#timer = setTimeout(() => {
        this.#running = this.check().then(() => {}, (error) => {
          if (this.#stopped) return; // the server is shutting down under it
          log.warn("guard.failed", "the WAL guard's check failed; it runs again", {
            error: errorMessage(error),
          });
        }).finally(next);
      }, this.#intervalMs);
      Deno.unrefTimer(Number(this.#timer));
    };
    next();
  }

  /**
   * One check of every stream and v1 slot (also for tests); false when
   * another check (this instance's timer, or another instance) was running.
   */
  async check(): Promise<boolean> {
    const { pool, names } = this.#deps;
    const client = await pool.connect();
    try {
      const { rows: [{ locked }] } = await client.query<{ locked: boolean }>(
        "SELECT pg_try_advisory_lock(hashtext($1 || '.wal_guard')) AS locked",
        [names.schema],
      );
      if (!locked) return false; // another instance is checking
      try {
        await this.#checkAll(client);
        return true;
      } finally {
        await client.query("SELECT pg_advisory_unlock(hashtext($1 || '.wal_guard'))", [
          names.schema,
        ]);
      }
    } finally {
      client.release();
    }
  }

  async #checkAll(client: pg.PoolClient): Promise<void> {
    // Slots of an older version become failover slots once no walsender holds them (17+).
    await this.#deps.slots.ensureFailover().catch(() => []);
    const schema = this.#deps.names.schema;
    // A connected consumer is activity: move the idle clocks of streams being read.
    for (const table of ["streams", "slots"]) {
      await client.query(
        `UPDATE ${schema}.${table} t SET last_activity = now() FROM pg_replication_slots s
          WHERE s.slot_name = t.slot_name AND s.active`,
      );
    }
    this.#settings ??= await readSettings(client);
    const { keepSize, lostReason } = this.#settings;
    const columns = `t.slot_name, extract(epoch FROM now() - t.last_activity)::float8 AS idle,
        t.invalidated_at IS NOT NULL AS invalidated, s.slot_name IS NOT NULL AS exists,
        t.slot_ready, host(inet_server_addr()) || ':' || inet_server_port() AS server,
        coalesce(s.active, false) AS active,
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8 AS lag,
        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::float8 AS retained,
        ${lostReason} AS lost`;
    const { rows } = await client.query<Guarded>(
      `SELECT 'stream' AS kind, t.name, t.limits, ${columns}
         FROM ${schema}.streams t LEFT JOIN pg_replication_slots s ON s.slot_name = t.slot_name
       UNION ALL
       SELECT 'v1', t.slot_name::text, NULL, ${columns}
         FROM ${schema}.slots t LEFT JOIN pg_replication_slots s ON s.slot_name = t.slot_name`,
    );
    const v1: { lag: number; idle: number } = { lag: 0, idle: 0 };
    for (const row of rows) {
      const label = row.kind === "v1" ? V1_STREAM_LABEL : row.name;
      const limits = row.limits ?? this.#deps.streamLimits;
      const { lagRatio, idleRatio } = standing(
        limits,
        row.lag,
        row.active ? 0 : row.idle,
        row.invalidated,
      );
      if (row.kind === "v1") {
        v1.lag = Math.max(v1.lag, row.invalidated ? 0 : lagRatio);
        v1.idle = Math.max(v1.idle, row.invalidated ? 0 : idleRatio);
      } else {
        this.#deps.metrics?.limits(label, lagRatio, idleRatio, row.invalidated);
      }
      if (row.invalidated) continue;
      if (!row.exists) {
        // Made once and gone now: the database failed over to a server that did not keep it (no
        // failover slots, or not synced yet), or someone dropped it. A new slot would skip what
        // the consumer has not acknowledged: the consumer is told instead (4410).
        if (row.slot_ready) {
          await this.#invalidate(row, lostSlotReason(row.slot_name, row.server));
        }
        continue;
      }
      const what = row.kind === "v1" ? `v1 slot "${row.name}"` : `stream "${row.name}"`;
      if (row.lost !== null) {
        await this.#invalidate(
          row,
          `PostgreSQL invalidated its slot (${row.lost}): it held more WAL than ` +
            `max_slot_wal_keep_size (${keepSize}) allows`,
        );
        continue;
      }
      if (lagRatio >= 1) {
        await this.#invalidate(
          row,
          `it was ${prettyBytes(row.lag!)} of WAL behind, over its limit of ${
            prettyBytes(limits.maxLagBytes)
          }`,
        );
        continue;
      }
      if (idleRatio >= 1) {
        await this.#invalidate(
          row,
          `it had no consumer for ${
            Math.round(row.idle)
          } s, over its limit of ${limits.maxIdleSeconds} s`,
        );
        continue;
      }
      this.#warn(
        what,
        label,
        "lag",
        lagRatio,
        () =>
          `is ${prettyBytes(row.lag ?? 0)} of WAL behind, ${Math.round(lagRatio * 100)}% of its ` +
          `limit of ${prettyBytes(limits.maxLagBytes)}`,
      );
      this.#warn(
        what,
        label,
        "idle",
        idleRatio,
        () =>
          `has had no consumer for ${Math.round(row.idle)} s, ${Math.round(idleRatio * 100)}% of ` +
          `its limit of ${limits.maxIdleSeconds} s`,
      );
    }
    this.#deps.metrics?.limits(V1_STREAM_LABEL, v1.lag, v1.idle, false);
  }

  /** Logs once per level crossed (50%, 80%); forgets the level once the stream falls below it. */
  #warn(what: string, label: string, limit: string, ratio: number, detail: () => string): void {
    const key = `${label}\u0000${what}\u0000${limit}`;
    const level = WARN_AT.find((at) => ratio >= at) ?? 0;
    const logged = this.#warned.get(key) ?? 0;
    if (level > logged) {
      log.warn("stream.limit_warning", `${what} ${detail()}; at 100% it is invalidated`, {
        stream: label,
        limit,
        ratio: Math.round(ratio * 100) / 100,
      });
    }
    if (level !== logged) this.#warned.set(key, level);
  }

  async #invalidate(row: Guarded, reason: string): Promise<void> {
    const { streams, slots, metrics } = this.#deps;
    const what = row.kind === "v1" ? `v1 slot "${row.name}"` : `stream "${row.name}"`;
    log.error("stream.invalidated", `${what} was invalidated and its slot dropped: ${reason}`, {
      stream: row.kind === "v1" ? V1_STREAM_LABEL : row.name,
      slot: row.slot_name,
      retainedBytes: row.retained ?? undefined,
    });
    if (row.kind === "stream") {
      await streams.invalidate({ name: row.name, slotName: row.slot_name }, reason);
    } else {
      const close = slotInvalidatedReason(row.slot_name);
      await slots.invalidate(
        row.slot_name,
        reason,
        (slot) => this.#deps.sessions.close(slot, CloseCode.StreamInvalidated, close),
      );
    }
    metrics?.invalidated(row.kind === "v1" ? V1_STREAM_LABEL : row.name);
  }

  /** Stops the timer; waits a moment for a check in progress (one stuck on the database is left). */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#running,
      new Promise((resolve) => timer = setTimeout(resolve, 1000)),
    ]);
    clearTimeout(timer);
  }
}
