/**
 * The server: its state (database pool, held snapshots, open sessions, the
 * slots it owns) composed in one place, and {@link startServer}, which puts
 * the HTTP edge in front of it on `Deno.serve`.
 * @module
 */

import type pg from "pg";
import { Authenticator } from "./auth/authenticator.ts";
import type { Config } from "./config.ts";
import { UnavailableError } from "./errors.ts";
import { createHttpApp } from "./http/app.ts";
import type { HttpHost } from "./http/host.ts";
import { createPool } from "./postgres/database.ts";
import { ensureSchema, type SchemaNames, schemaNames } from "./postgres/server_schema.ts";
import { TypeNames } from "./postgres/type_names.ts";
import { CloseCode, type HealthReport } from "./protocol.ts";
import { v1Scope } from "./replication/pgoutput_decoder.ts";
import type { ReplicationOptions } from "./replication/replication_service.ts";
import { type SlotInfo, SlotManager } from "./slots/slot_manager.ts";
import { failoverReadiness } from "./slots/failover.ts";
import { type ReleaseDetail, SnapshotStore } from "./snapshots/snapshot_store.ts";
import { log } from "./observability/log.ts";
import { SessionRegistry } from "./streams/session_registry.ts";
import { StreamManager } from "./streams/stream_manager.ts";
import { Metrics, type RelayReading, V1_STREAM_LABEL } from "./observability/metrics.ts";
import { TailHub } from "./streams/tail_hub.ts";
import { WalGuard } from "./streams/wal_guard.ts";
import { standing } from "./streams/wal_limits.ts";
import { Relay, RELAY_APPLICATION_PREFIX } from "./relay/relay.ts";
import type { StreamLog } from "./streams/stream_log.ts";

/** The server's state: everything a request may use, and a clean shutdown of all of it. */
export class Server implements HttpHost, AsyncDisposable {
  readonly config: Config;
  /** Short metadata queries: catalog look-ups, bookkeeping. */
  readonly pool: pg.Pool;
  /** Names of the server's own objects in the database. */
  readonly names: SchemaNames;
  /** Snapshots held for slots and streams (tests wait on their "release" events). */
  readonly snapshots: SnapshotStore;
  /** The v1 slots: init, find, drop. */
  readonly slots: SlotManager;
  /** Open websocket sessions, one per slot. */
  readonly sessions: SessionRegistry;
  /** Type names for frames' `columntypes`. */
  readonly typeNames: TypeNames;
  /** Read-only copies of v2 streams' frames. */
  readonly tails: TailHub;
  /** v2's named streams. */
  readonly streams: StreamManager;
  /** Checks credentials, mints consumer tokens. */
  readonly authenticator: Authenticator;
  /** Relay mode's NATS side: publishers, consumers, tails; none without `NATS_URL`. */
  relay: Relay | undefined;
  /** The streams' logs (the relay's), as the stream manager sees them. */
  get log(): StreamLog | undefined {
    return this.relay;
  }
  /** Weighs every stream against its WAL limits, on a timer. */
  readonly guard: WalGuard;
  /** The Prometheus metrics; none with `METRICS=off`. */
  readonly metrics: Metrics | undefined;
  #closing = false;
  #sampler: ReturnType<typeof setInterval> | undefined;
  /** The history sample being taken, if one is. */
  #sample: Promise<void> | undefined;

  private constructor(config: Config, pool: pg.Pool) {
    this.config = config;
    this.pool = pool;
    this.names = schemaNames(config.publicationPrefix);
    this.snapshots = new SnapshotStore(config.database, config.snapshotTtlSeconds, {
      readers: config.snapshotReaders,
      waitMs: config.snapshotReaderWaitMs,
    });
    this.slots = new SlotManager(config.database, pool, this.names, this.snapshots);
    this.sessions = new SessionRegistry(config.slotBusyTimeoutSeconds);
    this.typeNames = new TypeNames(pool);
    this.tails = new TailHub();
    this.metrics = config.metrics.enabled
      ? new Metrics({
        lag: () => this.#lags(),
        tails: () => this.tails.counts(),
        relay: config.relay === undefined ? undefined : () => this.#relayReadings(),
        backfills: () => this.streams.unfinishedBackfills(),
      }, config.metrics.historyIntervalMs)
      : undefined;
    this.streams = new StreamManager(this);
    this.guard = new WalGuard(
      { ...this, streamLimits: config.streamLimits },
      config.walGuardIntervalMs,
    );
    this.authenticator = new Authenticator(config.auth, config.metrics.token);
    this.snapshots.addEventListener("release", (event) => {
      const { slotName, reason } = (event as CustomEvent<ReleaseDetail>).detail;
      log.info("snapshot.released", `the snapshot of slot "${slotName}" was released: ${reason}`, {
        slot: slotName,
      });
    });
  }

  /** Connects to the database and sets up the server's schema and publications. */
  static async create(config: Config): Promise<Server> {
    if (config.relay !== undefined) {
      // Each instance's connections carry its name: the publisher of a stream is its walsender's.
      config = {
        ...config,
        database: {
          ...config.database,
          application_name: `${RELAY_APPLICATION_PREFIX}${config.relay.instance}`,
        },
      };
    }
    const pool = createPool(config.database);
    try {
      await ensureSchema(pool, schemaNames(config.publicationPrefix));
    } catch (error) {
      await pool.end();
      throw error;
    }
    const server = new Server(config, pool);
    if (config.relay !== undefined) {
      try {
        server.relay = await Relay.connect(config.relay, {
          database: config.database,
          streams: server.streams,
          metrics: server.metrics,
          busyTimeoutSeconds: config.slotBusyTimeoutSeconds,
          tails: server.tails,
        });
      } catch (error) {
        await server[Symbol.asyncDispose]();
        throw new Error(
          `Cannot connect to NATS at ${config.relay.servers.join(", ")}: ${
            (error as Error).message
          }`,
        );
      }
      server.relay.start();
    }
    server.guard.start();
    server.#startSampling();
    return server;
  }

  /** Samples the metric history on a timer (one sample in flight at most). */
  #startSampling(): void {
    const metrics = this.metrics;
    if (metrics === undefined) return;
    this.#sampler = setInterval(() => {
      this.#sample ??= metrics.sample().finally(() => (this.#sample = undefined));
    }, this.config.metrics.historyIntervalMs);
  }

  /** Throws an {@link UnavailableError} once shutdown has begun. */
  assertOpen(): void {
    if (this.#closing) throw new UnavailableError("The server is shutting down");
  }

  /** How the replication of a v1 slot is started: the server's publications, types and limits. */
  replicationOptions(slotName: string): ReplicationOptions {
    return {
      database: this.config.database,
      slotName,
      publications: [this.names.inserts, this.names.keyed],
      resolveTypes: (types) => this.typeNames.resolve(types),
      scope: v1Scope(this.names.schema),
      chunkBytes: this.config.frameChunkBytes,
      receiveTimeoutMs: this.config.replicationTimeoutMs,
    };
  }

  /** Relay mode: each stream's log, and whether this instance publishes it. */
  async #relayReadings(): Promise<RelayReading[]> {
    const relay = this.relay;
    if (relay === undefined) return [];
    // Every stream's log at once: a scrape waits one round trip to NATS, not one per stream.
    const readings = await Promise.all(
      (await this.streams.listStored()).map(async (stream) => {
        const state = await relay.log.state(stream.name);
        return state === undefined ? undefined : {
          stream: stream.name,
          publishing: relay.publishers.publishes(stream.name),
          ...state,
        };
      }),
    );
    return readings.filter((reading) => reading !== undefined);
  }

  /** Each stream's slot lag in bytes, by metrics label (v1 slots together, the largest). */
  async #lags(): Promise<Map<string, number | null>> {
    const { rows } = await this.pool.query<{ stream: string; lag: number | null }>(
      `SELECT coalesce(st.name, $1) AS stream,
              max(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn))::float8 AS lag
         FROM pg_replication_slots s
         LEFT JOIN ${this.names.schema}.streams st ON st.slot_name = s.slot_name
         LEFT JOIN ${this.names.schema}.slots v ON v.slot_name = s.slot_name
        WHERE st.name IS NOT NULL OR v.slot_name IS NOT NULL
        GROUP BY 1`,
      [V1_STREAM_LABEL],
    );
    return new Map(rows.map((r: { stream: string; lag: number | null }) => [r.stream, r.lag]));
  }

  /**
   * What the start-up log says about WAL: each stream's and v1 slot's retained WAL, and
   * PostgreSQL's `max_slot_wal_keep_size` (a recommendation to set it when it is not).
   */
  async walReport(): Promise<{ lines: string[]; keepSize: string }> {
    const { rows } = await this.pool.query<{ line: string; keep: string }>(
      `SELECT format('%s (slot %s): %s of WAL', o.label, s.slot_name,
                     pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))) AS line,
              current_setting('max_slot_wal_keep_size') AS keep
         FROM pg_replication_slots s
         JOIN (SELECT slot_name, format('stream %s', name) AS label FROM ${this.names.schema}.streams
               UNION ALL SELECT slot_name, 'v1' FROM ${this.names.schema}.slots) o
           ON o.slot_name = s.slot_name
        ORDER BY 1`,
    );
    const keepSize = rows[0]?.keep ?? (await this.pool.query<{ keep: string }>(
      "SELECT current_setting('max_slot_wal_keep_size') AS keep",
    )).rows[0].keep;
    return { lines: rows.map((r: { line: string }) => r.line), keepSize };
  }

  /** Slots this server's earlier runs created that still exist, with the WAL each holds back. */
  async leftoverSlots(): Promise<string[]> {
    const { rows } = await this.pool.query<{ line: string }>(
      `SELECT format('%s (%s, holding %s of WAL)', s.slot_name, CASE WHEN s.active THEN 'active' ELSE 'inactive' END,
                     pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))) AS line
         FROM pg_replication_slots s JOIN ${this.names.schema}.slots o ON o.slot_name = s.slot_name
        ORDER BY s.slot_name`,
    );
    return rows.map((r: { line: string }) => r.line);
  }

  /** The database, every slot of it, and what this server does with each. */
  async health(): Promise<HealthReport> {
    try {
      const [{ rows }, slots, failover] = await Promise.all([
        this.pool.query<{ wal_level: string; lsn: string }>(
          "SELECT current_setting('wal_level') AS wal_level, pg_current_wal_lsn()::text AS lsn",
        ),
        this.slots.list(),
        failoverReadiness(this.pool, this.names.schema).catch(() => undefined),
      ]);
      const held = new Set(this.snapshots.slots());
      return {
        status: this.#closing ? "stopping" : "ok",
        database: { reachable: true, walLevel: rows[0].wal_level, currentLsn: rows[0].lsn },
        slots: slots.map((s: SlotInfo) => ({
          slotName: s.slot_name,
          ownedByPgdeltastream: s.owned,
          exists: s.plugin !== null,
          plugin: s.plugin,
          activePid: s.active_pid,
          confirmedFlushLsn: s.confirmed_flush_lsn,
          streaming: this.sessions.has(s.slot_name),
          snapshotHeld: held.has(s.slot_name),
          v1: s.v1,
          lagBytes: s.lag_bytes,
          retainedBytes: s.retained_bytes,
          ...(s.v1
            ? {
              health: standing(
                this.config.streamLimits,
                s.lag_bytes,
                s.active_pid !== null || this.sessions.has(s.slot_name) ? 0 : s.idle_seconds ?? 0,
                s.invalidated_at !== null,
              ).health,
              ...(s.invalidated_at ? { invalidatedAt: s.invalidated_at.toISOString() } : {}),
            }
            : {}),
        })),
        failover,
      };
    } catch (error) {
      return {
        status: "degraded",
        database: { reachable: false, error: (error as Error).message },
      };
    }
  }

  /** Closes every stream with 1001, releases snapshots and connections. Slots are kept. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#closing = true;
    clearInterval(this.#sampler);
    await this.#sample;
    await this.guard[Symbol.asyncDispose]();
    await this.relay?.[Symbol.asyncDispose]();
    this.tails.closeAll(CloseCode.GoingAway, "server shutting down");
    await this.sessions.closeAll(CloseCode.GoingAway, "server shutting down");
    await this.snapshots[Symbol.asyncDispose]();
    await this.pool.end();
  }
}

/** How long a shutdown waits for HTTP responses still being written. */
const SHUTDOWN_GRACE_MS = 2000;

/** A running server: its address, its state, and a clean shutdown. */
export interface RunningServer extends AsyncDisposable {
  readonly app: Server;
  readonly url: URL;
  readonly finished: Promise<void>;
}

/** Starts the API on the configured address; dispose it to shut down gracefully. */
export async function startServer(config: Config): Promise<RunningServer> {
  const app = await Server.create(config);
  const http = createHttpApp(app);
  const listening = Promise.withResolvers<Deno.NetAddr>();
  let server: Deno.HttpServer;
  try {
    server = Deno.serve({
      hostname: config.hostname,
      port: config.port,
      onListen: (addr) => listening.resolve(addr),
    }, http.fetch);
  } catch (error) {
    await app[Symbol.asyncDispose]();
    throw error;
  }
  const addr = await listening.promise;
  const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
  let stopped: Promise<void> | undefined;
  return {
    app,
    url: new URL(`http://${host}:${addr.port}`),
    finished: server.finished,
    [Symbol.asyncDispose]() {
      stopped ??= (async () => {
        await app[Symbol.asyncDispose]();
        // A client that reads nothing (a stalled export) holds its response, and a graceful
        // shutdown with it, for as long as it likes: wait for the others, not for it.
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          server.shutdown(),
          new Promise((resolve) => (timer = setTimeout(resolve, SHUTDOWN_GRACE_MS))),
        ]);
        clearTimeout(timer);
      })();
      return stopped;
    },
  };
}
