/**
 * v2's named streams: each its own slot, its own exported snapshot, its own
 * definition of the tables, columns, rows and kinds of change it carries.
 * Creating one is atomic (no slot is left behind on any failure); deleting
 * one closes its consumer and tails, releases its snapshot, drops its slot.
 * @module
 */

import type pg from "pg";
import type { Config } from "../config.ts";
import { NotFoundError, UnavailableError } from "../errors.ts";
import { SqlState, sqlState } from "../postgres/database.ts";
import type { SchemaNames } from "../postgres/server_schema.ts";
import type { TypeNames } from "../postgres/type_names.ts";
import {
  CloseCode,
  type CloseCodeValue,
  type CreateStreamResponse,
  type StreamDefinitionBody,
  type StreamLimits,
  type StreamOperation,
  type StreamStateBody,
} from "../protocol.ts";
import type { ReplicationOptions } from "../replication/replication_service.ts";
import type { SlotManager } from "../slots/slot_manager.ts";
import type { SnapshotSource } from "../snapshots/snapshot_reader.ts";
import type { SnapshotOwner, SnapshotStore } from "../snapshots/snapshot_store.ts";
import type { SessionRegistry } from "./session_registry.ts";
import {
  describeTables,
  type RequestTable,
  resolveDefinition,
  type StreamDefinition,
} from "./stream_definition.ts";
import {
  createInsertPublication,
  dropInsertPublication,
  insertPublicationName,
  missingTables,
  setInsertPublication,
  streamPublications,
} from "./stream_publication.ts";
import {
  assertSwitchConfirmed,
  diffDefinitions,
  OPEN_TRANSACTIONS_WAIT_MS,
  recordChange,
  switchConfirmed,
  waitForOpenTransactions,
  withChangeLock,
} from "./stream_change.ts";
import { formatLsn, type Lsn, parseLsn } from "../lsn.ts";
import { StreamView } from "./stream_view.ts";
import { standing } from "./wal_limits.ts";
import { type StoredStream, StreamStore } from "./stream_store.ts";
import type { TailHub } from "./tail_hub.ts";
import type { Metrics } from "../observability/metrics.ts";
import type { StreamLog } from "./stream_log.ts";
import { errorMessage, log } from "../observability/log.ts";
import { backfillBody, BackfillStore } from "../backfill/backfill_store.ts";
import { BackfillTap, BackfillWakers } from "../backfill/backfill_tap.ts";
import { DEFAULT_CHUNK_BYTES, resolveBackfillTable } from "../backfill/chunk_reader.ts";
import type { BackfillBody, BackfillMode } from "../protocol.ts";
import { InvalidRequestError } from "../errors.ts";
import type { RequestCondition } from "./stream_definition.ts";

/** What creating a stream takes, validated. */
export interface CreateStream {
  name: string;
  tables: RequestTable[];
  operations: StreamOperation[];
  /** Limits given; the others are the server's defaults. */
  limits: Partial<StreamLimits>;
  /** How its consumer gets its first copy. */
  initial: "snapshot" | "backfill";
}

/** What changing a running stream takes (`PATCH`), validated. */
export interface ChangeStream {
  /** The full new list of its tables. */
  tables?: RequestTable[];
  operations?: StreamOperation[];
  limits?: Partial<StreamLimits>;
  /** Whether a table added, or whose columns or filter changed, gets a `replace` backfill. */
  backfill: boolean;
}

/** What starting a backfill takes, validated. */
export interface StartBackfill {
  table: string;
  mode: BackfillMode;
  where: RequestCondition[];
}

/** Backfills read through the watermark messages that pgoutput carries from PostgreSQL 14. */
const BACKFILL_MIN_VERSION = 140000;

/** What the manager works with: the server's state. */
export interface StreamDependencies {
  config: Config;
  pool: pg.Pool;
  names: SchemaNames;
  slots: SlotManager;
  snapshots: SnapshotStore;
  sessions: SessionRegistry;
  tails: TailHub;
  typeNames: TypeNames;
  metrics?: Metrics;
  /** Relay mode's log of each stream, read when needed (it connects after the manager is made). */
  readonly log?: StreamLog;
}

/** The close reason of an invalidated stream or slot (at most 123 bytes): what was lost, what to do. */
function invalidatedReason(what: string, remedy: string): string {
  return `${what} invalidated: changes lost; ${remedy} for a new snapshot`;
}

/** Why a stream or v1 slot whose slot was made and is gone now is invalidated. */
export function lostSlotReason(slotName: string, server: string | null): string {
  return `its slot ${slotName} does not exist on the PostgreSQL at ${
    server ?? "its socket"
  } (a failover to a server that did not keep it, or a drop by hand)`;
}

/** The close reason for consumers of the invalidated stream `name`, now and on every later connection. */
export function streamInvalidatedReason(name: string): string {
  return invalidatedReason(`stream ${name}`, "POST .../reset");
}

/** The close reason for consumers of the invalidated v1 slot `slotName`. */
export function slotInvalidatedReason(slotName: string): string {
  return invalidatedReason(`slot ${slotName}`, "call /v1/init");
}

/** The slot of a new stream: its name (`-` as `_`) and six random hex digits, in `[a-z0-9_]`. */
function slotNameFor(name: string): string {
  const random = [...crypto.getRandomValues(new Uint8Array(3))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  return `pgds_${name.replaceAll("-", "_")}_${random}`;
}

/** The named streams of the database. */
export class StreamManager {
  readonly #deps: StreamDependencies;
  readonly #store: StreamStore;
  readonly #backfills: BackfillStore;
  readonly #wakers = new BackfillWakers();

  /** Manages streams with the server's `deps`. */
  constructor(deps: StreamDependencies) {
    this.#deps = deps;
    this.#store = new StreamStore(deps.pool, deps.names.schema);
    this.#backfills = new BackfillStore(deps.pool, deps.names.schema);
  }

  /** Whose snapshot a stream's is, and what its reader does once it is gone. */
  snapshotOwner(name: string): SnapshotOwner {
    return {
      label: `stream "${name}"`,
      remedy:
        `create the stream again for a new snapshot (DELETE /v2/streams/${name}, then POST /v2/streams)`,
    };
  }

  /** The stored stream `name`; a {@link NotFoundError} (`action`: …) if there is none. */
  async require(name: string, action = "Cannot find stream"): Promise<StoredStream> {
    const stream = await this.#store.get(name);
    if (stream === undefined) throw new NotFoundError(`${action}: stream "${name}" does not exist`);
    return stream;
  }

  /**
   * Creates the stream: resolves its definition, records it, then creates
   * its slot with an exported snapshot. If the slot cannot be made (or
   * held), the slot is dropped and the record deleted.
   */
  async create(request: CreateStream): Promise<CreateStreamResponse> {
    const { pool, names } = this.#deps;
    const definition = await resolveDefinition(
      pool,
      names.schema,
      request.tables,
      request.operations,
    );
    if (request.initial === "backfill") {
      // Every table must be one a backfill can read: refused now, not when the consumer connects.
      await this.#assertBackfills();
      for (const table of definition.tables) await resolveBackfillTable(pool, table);
      definition.initial = "backfill";
    }
    const limits = { ...this.#deps.config.streamLimits, ...request.limits };
    const stream = await this.#store.insert(
      request.name,
      slotNameFor(request.name),
      definition,
      limits,
    );
    let response: CreateStreamResponse;
    try {
      response = await this.#start(stream);
    } catch (error) {
      await this.#forget(stream);
      throw this.#slotError(error, "Cannot create stream");
    }
    log.info("stream.created", `stream "${stream.name}" was created`, {
      stream: stream.name,
      slot: stream.slotName,
      tables: definition.tables.map((t) => `${t.schema}.${t.table}`).join(","),
      initial: definition.initial ?? "snapshot",
    });
    return response;
  }

  /**
   * Makes the stream's slot and its consumer's first copy: an exported
   * snapshot held, or (`initial: "backfill"`) a `replace` backfill of each
   * table, queued, and no snapshot at all.
   */
  async #start(stream: StoredStream): Promise<CreateStreamResponse> {
    const { pool, slots, snapshots } = this.#deps;
    const byBackfill = stream.definition.initial === "backfill";
    await slots.syncPublication();
    await createInsertPublication(pool, stream.slotName, stream.definition);
    await slots.createSlot(
      stream.slotName,
      byBackfill ? undefined : this.snapshotOwner(stream.name),
    );
    if (!byBackfill) {
      return {
        ...await this.#body(stream),
        snapshot: { expiresAt: snapshots.expiresAt(stream.slotName)!.toISOString() },
      };
    }
    const backfills = [];
    for (const table of stream.definition.tables) {
      const backfill = await this.#backfills.queue({
        stream: stream.name,
        tableOid: table.oid,
        schema: table.schema,
        table: table.table,
        mode: "replace",
        conditions: [],
      });
      backfills.push({ id: backfill.id, table: `${table.schema}.${table.table}` });
    }
    this.#wakers.wake(stream.name);
    return { ...await this.#body(stream), backfills };
  }

  /** A {@link InvalidRequestError} unless the database can carry backfills (PostgreSQL 14+). */
  async #assertBackfills(action = "Cannot backfill"): Promise<void> {
    const { rows: [{ version }] } = await this.#deps.pool.query<{ version: number }>(
      "SELECT current_setting('server_version_num')::int AS version",
    );
    if (version < BACKFILL_MIN_VERSION) {
      throw new InvalidRequestError(
        `${action}: it needs PostgreSQL 14 or later (logical decoding messages in pgoutput)`,
      );
    }
  }

  #slotError(error: unknown, action: string): unknown {
    if (sqlState(error) !== SqlState.ConfigurationLimitExceeded) return error;
    return new UnavailableError(
      `${action}: all replication slots are in use (${(error as Error).message}); ` +
        "delete unused streams or raise max_replication_slots",
    );
  }

  /** The limits of `stream`: its own, or (stored before limits existed) the server's. */
  limitsOf(stream: StoredStream): StreamLimits {
    return stream.limits ?? this.#deps.config.streamLimits;
  }

  /**
   * Invalidates the stream: records why (so every instance answers its
   * consumers with 4410), closes its consumer and tails with 4410, releases
   * its snapshot and drops its slot, so PostgreSQL releases the WAL.
   */
  async invalidate(stream: Pick<StoredStream, "name" | "slotName">, reason: string): Promise<void> {
    await this.#store.invalidate(stream.name, reason);
    const close = streamInvalidatedReason(stream.name);
    this.#deps.log?.close(stream.name, CloseCode.StreamInvalidated, close);
    await this.#teardown(
      stream,
      CloseCode.StreamInvalidated,
      close,
      `the stream was invalidated: ${reason}`,
    );
  }

  /**
   * What deleting, invalidating and resetting a stream share: its tails and
   * consumer are closed with `code` and `reason`, its snapshot released (for
   * `released`), its slot and insert publication dropped.
   */
  async #teardown(
    stream: Pick<StoredStream, "name" | "slotName">,
    code: CloseCodeValue,
    reason: string,
    released: string,
  ): Promise<void> {
    const { sessions, tails, snapshots, slots, pool } = this.#deps;
    tails.close(stream.name, code, reason);
    await sessions.close(stream.slotName, code, reason);
    await snapshots.release(stream.slotName, released);
    await slots.dropSlot(stream.slotName);
    await dropInsertPublication(pool, stream.slotName);
  }

  /**
   * Re-creates the stream's slot and snapshot with the same definition and
   * limits: what an invalidated stream needs, in one call. An open
   * consumer is closed with 4000 (its position is gone).
   */
  async reset(name: string): Promise<CreateStreamResponse> {
    const old = await this.require(name, "Cannot reset stream");
    await this.#teardown(old, CloseCode.SlotDropped, "stream reset", "the stream was reset");
    const stream = await this.#store.replaceSlot(name, slotNameFor(name));
    // The consumer's copy starts again: so do the backfills under way.
    await this.#backfills.restart(name);
    let response: CreateStreamResponse;
    try {
      const log = this.#deps.log;
      // The log's frames belong to the old slot: consumers positioned there are told (4411).
      if (log !== undefined) await this.#store.setRelayStart(name, await log.reset(name));
      response = await this.#start(stream);
    } catch (error) {
      // Invalidating releases the new snapshot and drops the new slot, if they were made.
      await this.invalidate(stream, "its reset failed; reset it again").catch(() => {});
      throw this.#slotError(error, "Cannot reset stream");
    }
    log.info("stream.reset", `stream "${name}" has a new slot and a new first copy`, {
      stream: name,
      slot: stream.slotName,
      previousSlot: old.slotName,
    });
    return response;
  }

  /** Undoes a failed create: drops the slot if it exists, then the record (kept if the drop fails). */
  async #forget(stream: StoredStream): Promise<void> {
    try {
      await this.#deps.snapshots.release(stream.slotName, "the stream could not be created");
      await this.#deps.slots.dropSlot(stream.slotName);
      await dropInsertPublication(this.#deps.pool, stream.slotName);
      await this.#store.delete(stream.name);
    } catch (error) {
      log.error(
        "stream.left",
        `stream "${stream.name}" could not be created, nor its slot dropped; ` +
          `DELETE /v2/streams/${stream.name} removes both`,
        { stream: stream.name, slot: stream.slotName, error: errorMessage(error) },
      );
    }
  }

  async #body(stream: StoredStream): Promise<StreamDefinitionBody> {
    return {
      name: stream.name,
      slotName: stream.slotName,
      tables: await describeTables(this.#deps.pool, stream.definition),
      operations: stream.definition.operations,
      limits: this.limitsOf(stream),
      createdAt: stream.createdAt.toISOString(),
      initial: stream.definition.initial ?? "snapshot",
    };
  }

  /**
   * Whether the stream's slot was made and is gone (a failover to a server
   * that did not keep it): then the stream is invalidated now, so that its
   * consumer is told 4410 rather than 404, and never given a new slot.
   */
  async invalidateIfLost(stream: StoredStream): Promise<boolean> {
    const { rows: [row] } = await this.#deps.pool.query<{ lost: boolean; server: string | null }>(
      `SELECT t.slot_ready AND s.slot_name IS NULL AS lost,
              host(inet_server_addr()) || ':' || inet_server_port() AS server
         FROM ${this.#deps.names.schema}.streams t
         LEFT JOIN pg_replication_slots s ON s.slot_name = t.slot_name
        WHERE t.name = $1`,
      [stream.name],
    );
    if (row?.lost !== true) return false;
    const reason = lostSlotReason(stream.slotName, row.server);
    log.error("stream.invalidated", `stream "${stream.name}" was invalidated: ${reason}`, {
      stream: stream.name,
      slot: stream.slotName,
    });
    await this.invalidate(stream, reason);
    this.#deps.metrics?.invalidated(stream.name);
    return true;
  }

  /** Each stream as stored (no state: no database round trip per stream). */
  async listStored(): Promise<StoredStream[]> {
    return await this.#store.list();
  }

  /** Each stream with its definition and state. */
  async list(): Promise<StreamStateBody[]> {
    const streams = await this.#store.list();
    return await Promise.all(streams.map((s) => this.#state(s)));
  }

  /** The stream `name` with its definition and state. */
  async get(name: string): Promise<StreamStateBody> {
    return await this.#state(await this.require(name));
  }

  async #state(stream: StoredStream): Promise<StreamStateBody> {
    const { rows } = await this.#deps.pool.query<
      {
        active: boolean | null;
        confirmed: string | null;
        lag: string | null;
        retained: string | null;
        idle: number;
        app: string | null;
        waiting: string | null;
      }
    >(
      `SELECT s.active, s.confirmed_flush_lsn::text AS confirmed,
              (SELECT string_agg(trim(n), ', ')
                 FROM unnest(string_to_array(current_setting('synchronized_standby_slots', true), ',')) n
                 LEFT JOIN pg_replication_slots p ON p.slot_name = trim(n)
                WHERE trim(n) <> '' AND NOT coalesce(p.active, false)) AS waiting,
              (SELECT application_name FROM pg_stat_activity WHERE pid = s.active_pid) AS app,
              pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8::text AS lag,
              pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::int8::text AS retained,
              extract(epoch FROM now() - $2::timestamptz)::float8 AS idle
         FROM (SELECT 1) AS one LEFT JOIN pg_replication_slots s ON s.slot_name = $1`,
      [stream.slotName, stream.lastActivity],
    );
    const slot = rows[0];
    const active = this.#deps.sessions.has(stream.slotName) || slot.active === true;
    const retained = slot.retained === null ? null : Number(slot.retained);
    const lagBytes = slot.lag === null ? null : Number(slot.lag);
    const { health } = standing(
      this.limitsOf(stream),
      lagBytes,
      active ? 0 : slot.idle,
      stream.invalidated !== null,
    );
    const expires = this.#deps.snapshots.expiresAt(stream.slotName);
    const consumer = this.#deps.metrics?.consumerOf(stream.name);
    return {
      ...await this.#body(stream),
      ...(slot.waiting && stream.invalidated === null
        ? {
          waitingFor: `standby slot ${slot.waiting} is not connected: PostgreSQL holds the ` +
            "stream's changes back until it is (synchronized_standby_slots)",
        }
        : {}),
      active,
      confirmedLsn: slot.confirmed,
      lagBytes,
      snapshotHeld: expires !== undefined,
      ...(expires ? { snapshotExpiresAt: expires.toISOString() } : {}),
      tails: this.#deps.tails.count(stream.name),
      health,
      retainedBytes: retained,
      ...(this.#deps.log ? { relay: await this.#deps.log.state(stream.name, slot.app) } : {}),
      lastActivityAt: (active ? new Date() : stream.lastActivity).toISOString(),
      ...(consumer ? { consumer } : {}),
      backfills: (await this.#backfills.list(stream.name))
        .filter((b) => b.finishedAt === null).map(backfillBody),
      ...(stream.invalidated
        ? {
          invalidated: {
            at: stream.invalidated.at.toISOString(),
            reason: stream.invalidated.reason,
          },
        }
        : {}),
    };
  }

  /** Deletes the stream: closes its consumer and tails (4000), releases its snapshot, drops its slot. */
  async delete(name: string): Promise<void> {
    const stream = await this.require(name, "Cannot delete stream");
    await this.#teardown(stream, CloseCode.SlotDropped, "stream deleted", "the stream was deleted");
    await this.#store.delete(name);
    await this.#deps.log?.deleted(name);
    log.info("stream.dropped", `stream "${name}" was deleted and its slot dropped`, {
      stream: name,
      slot: stream.slotName,
    });
  }

  /**
   * Changes the limits of the stream `name` (those not given stay): the WAL
   * guard weighs it against them from its next round.
   */
  async setLimits(name: string, limits: Partial<StreamLimits>): Promise<StreamStateBody> {
    const stream = await this.require(name, "Cannot change stream");
    const updated = { ...this.limitsOf(stream), ...limits };
    const stored = await this.#store.setLimits(name, updated);
    if (stored === undefined) {
      throw new NotFoundError(`Cannot change stream: stream "${name}" does not exist`);
    }
    log.info("stream.limits_changed", `the limits of stream "${name}" were changed`, {
      stream: name,
      maxLagBytes: updated.maxLagBytes,
      maxIdleSeconds: updated.maxIdleSeconds,
    });
    return await this.#state(stored);
  }

  /**
   * Changes the stream's tables, operations and limits (see
   * `stream_change.ts`): the new definition takes effect at one position in
   * its log, and its consumer stays connected. The stream as {@link get}
   * shows it, with the backfills started (its `backfills`).
   */
  async change(
    name: string,
    request: ChangeStream,
  ): Promise<StreamStateBody> {
    await this.require(name, "Cannot change stream");
    if (request.tables === undefined && request.operations === undefined) {
      return await this.setLimits(name, request.limits ?? {});
    }
    await this.#assertBackfills("Cannot change stream");
    return await withChangeLock(
      this.#deps.pool,
      `${this.#deps.names.schema}.change.${name}`,
      () => this.#change(name, request),
    );
  }

  /** {@link change} of the tables or operations, under the stream's change lock. */
  async #change(name: string, request: ChangeStream): Promise<StreamStateBody> {
    const { pool, names } = this.#deps;
    // Read under the lock: no other change of the stream is under way.
    let stream = await this.require(name, "Cannot change stream");
    const current = stream.definition;
    const operations = request.operations ?? current.operations;
    const definition: StreamDefinition = request.tables === undefined
      ? { ...current, operations }
      : {
        ...await resolveDefinition(pool, names.schema, request.tables, operations, {
          action: "Cannot change stream",
          field: (index) => `tables[${index}].`,
        }),
        ...(current.initial ? { initial: current.initial } : {}),
      };
    const diff = diffDefinitions(current, definition);
    const sameOperations = definition.operations.length === current.operations.length &&
      definition.operations.every((o) => current.operations.includes(o));
    if (
      sameOperations && diff.added.length === 0 && diff.removed.length === 0 &&
      diff.changed.length === 0
    ) {
      // Nothing to change in the log (a retried request, say): no switch, which would hold back
      // the next change.
      if (request.limits !== undefined) stream = await this.#limited(stream, request.limits);
      return { ...await this.#state(stream), backfills: [] };
    }
    await assertSwitchConfirmed(pool, stream);
    const publication = insertPublicationName(stream.slotName);
    const { rows: [{ own }] } = await pool.query<{ own: boolean }>(
      "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS own",
      [publication],
    );
    const ownName = own ? publication : undefined;
    // Kinds of change dropped are dropped by the decoder; added ones need the walsender started
    // again (by the replication, at the change) with their publications, which exist already:
    // the shared ones, or the stream's own insert publication, set to the new tables first.
    const insertAdded = definition.operations.includes("insert") &&
      !current.operations.includes("insert");
    if (request.backfill) {
      // Every table that gets a backfill must be one a backfill can read: refused now.
      for (const table of [...diff.added, ...diff.changed]) await resolveBackfillTable(pool, table);
    }
    const widens = ownName !== undefined &&
      (diff.added.length > 0 || diff.changed.length > 0 || insertAdded);
    /** Puts the publication back as it was, unless the change was recorded after all. */
    const revert = async () => {
      if (!widens) return;
      const now = await this.#store.get(name);
      if (now !== undefined && JSON.stringify(now.definition) !== JSON.stringify(current)) return;
      await setInsertPublication(pool, ownName, current).catch((error) =>
        log.warn(
          "stream.publication_wide",
          `stream "${name}" still publishes every row of its tables: ${errorMessage(error)}`,
          { stream: name },
        )
      );
    };
    if (widens) {
      // Every row of the old tables and the new in the log from here; then no transaction still
      // open may have written rows before (its changes of an added table would be missing).
      try {
        await setInsertPublication(pool, ownName, {
          ...definition,
          tables: [...current.tables, ...diff.added],
        }, false);
      } catch (error) {
        if (sqlState(error) !== SqlState.InsufficientPrivilege) throw error;
        throw new InvalidRequestError(
          `Cannot change stream: the server's role may not publish the tables added ` +
            `(${errorMessage(error)}); grant it ownership of them, or create a new stream`,
        );
      }
    }
    let outcome;
    try {
      if (widens) await waitForOpenTransactions(pool, OPEN_TRANSACTIONS_WAIT_MS);
      outcome = await recordChange(
        pool,
        this.#store,
        this.#backfills,
        name,
        definition,
        request.backfill,
      );
    } catch (error) {
      await revert().catch(() => {});
      throw error;
    }
    stream = outcome.stream;
    if (ownName !== undefined && definition.operations.includes("insert")) {
      // Exactly the new definition's rows (and filters) from here: the decoder carries it already.
      await setInsertPublication(pool, ownName, definition).catch((error) =>
        log.warn(
          "stream.publication_wide",
          `stream "${name}" still publishes every row of its tables: ${errorMessage(error)}`,
          { stream: name },
        )
      );
    }
    if (request.limits !== undefined) stream = await this.#limited(stream, request.limits);
    this.#wakers.wake(name);
    log.info("stream.changed", `stream "${name}" was changed`, {
      stream: name,
      added: diff.added.map((t) => `${t.schema}.${t.table}`).join(","),
      removed: diff.removed.map((t) => `${t.schema}.${t.table}`).join(","),
      changed: diff.changed.map((t) => `${t.schema}.${t.table}`).join(","),
      operations: definition.operations.join(","),
      backfills: outcome.started.map((b) => b.id).join(","),
    });
    return { ...await this.#state(stream), backfills: outcome.started.map(backfillBody) };
  }

  /** `stream` with `limits` (those given) stored. */
  async #limited(stream: StoredStream, limits: Partial<StreamLimits>): Promise<StoredStream> {
    return await this.#store.setLimits(stream.name, { ...this.limitsOf(stream), ...limits }) ??
      stream;
  }

  /** Releases the stream's snapshot before its time-to-live (it holds back vacuum). */
  async releaseSnapshot(name: string): Promise<void> {
    const stream = await this.require(name, "Cannot release snapshot");
    await this.#deps.snapshots.release(stream.slotName, "it was released by DELETE .../snapshot");
  }

  /** What `stream` lets its consumers see: its frames, its snapshot's reads, their order. */
  viewOf(stream: StoredStream): StreamView {
    return new StreamView(stream.name, stream.definition, this.#deps.pool);
  }

  /** The stream's snapshot, seen through the stream's view. */
  async snapshotSource(name: string): Promise<SnapshotSource> {
    const stream = await this.require(name, "Cannot read snapshot");
    const owner = this.snapshotOwner(name);
    const metrics = this.#deps.metrics;
    return {
      snapshot: this.#deps.snapshots.get(stream.slotName, owner),
      current: this.#deps.pool,
      ownSchema: this.#deps.names.schema,
      remedy: owner.remedy,
      view: this.viewOf(stream),
      // Only where something records them: counting an export's rows scans every chunk.
      countRows: metrics && ((rows) => metrics.snapshotRows(name, rows)),
    };
  }

  /**
   * How the replication of the stream's slot is started (its publications
   * and scope), and the check an open stream repeats: a reason to stop when
   * its insert publication lost one of its tables (`DROP … CASCADE`).
   */
  async replicationPlan(
    stream: StoredStream,
  ): Promise<{ options: ReplicationOptions; check: () => Promise<string | undefined> }> {
    const { config, names, typeNames, pool } = this.#deps;
    const name = insertPublicationName(stream.slotName);
    const { rows: [facts] } = await pool.query<{ own: boolean; version: number }>(
      `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS own,
              current_setting('server_version_num')::int AS version`,
      [name],
    );
    const own = facts.own ? name : undefined;
    const metrics = this.#deps.metrics;
    // A change of the definition its consumer is not past yet: the log carries the one before it
    // up to the change's transaction.
    let pending: { nonce: string; lsn: Lsn | null; definition: StreamDefinition } | undefined;
    const change = stream.switch;
    if (change !== null) {
      if (await switchConfirmed(pool, stream)) {
        await this.#store.endSwitch(stream.name, change.nonce);
      } else {
        pending = {
          nonce: change.nonce,
          lsn: change.lsn === null ? null : parseLsn(change.lsn),
          definition: stream.definition,
        };
      }
    }
    const definition = pending === undefined ? stream.definition : change!.previous;
    // Before a change not yet past, the walsender reads the kinds of change of both definitions
    // (the decoder drops what the one it carries does not want): wherever in the log it starts
    // (the slot's position may move while it waits for the slot), it needs no restart.
    const reading = pending === undefined ? definition.operations : [
      ...new Set([...definition.operations, ...stream.definition.operations]),
    ];
    const scopeOf = (d: StreamDefinition) => new StreamView(stream.name, d, pool).scope;
    const store = this.#store;
    return {
      options: {
        database: config.database,
        slotName: stream.slotName,
        publications: streamPublications(names, { ...definition, operations: reading }, own),
        resolveTypes: (types) => typeNames.resolve(types),
        scope: scopeOf(definition),
        chunkBytes: config.frameChunkBytes,
        receiveTimeoutMs: config.replicationTimeoutMs,
        tap: facts.version < BACKFILL_MIN_VERSION ? undefined : new BackfillTap({
          database: config.database,
          pool,
          store: this.#backfills,
          stream: stream.name,
          definition,
          pendingSwitch: pending,
          scopeOf,
          async markSwitch(nonce, txLsn) {
            const found = await store.markSwitch(stream.name, nonce, formatLsn(txLsn));
            return found?.switch ? { ...found.switch, definition: found.definition } : undefined;
          },
          reading,
          async publicationsOf(next) {
            const { rows: [{ exists }] } = await pool.query<{ exists: boolean }>(
              "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1) AS exists",
              [name],
            );
            return streamPublications(names, next, exists ? name : undefined);
          },
          async storedSwitch() {
            const now = await store.get(stream.name);
            const change = now?.switch;
            return change
              ? {
                nonce: change.nonce,
                lsn: change.lsn === null ? null : parseLsn(change.lsn),
                definition: now!.definition,
              }
              : undefined;
          },
          wakers: this.#wakers,
          countRows: metrics && ((rows) => metrics.backfillRows(stream.name, rows)),
          limits: { rows: config.backfillChunkRows, bytes: DEFAULT_CHUNK_BYTES },
        }),
      },
      check: async () => {
        if (own === undefined) return undefined;
        // The stored definition: the publication follows it (a change widens it first).
        const now = await store.get(stream.name);
        const missing = await missingTables(pool, own, now?.definition ?? stream.definition);
        // Short: it is a close reason (at most 123 bytes).
        return missing.length === 0
          ? undefined
          : `${
            missing[0]
          } left the stream's publication (CASCADE?); re-create stream ${stream.name}`;
      },
    };
  }

  /**
   * Queues a backfill of one of the stream's tables (at most one per table
   * waits: asking again answers the queued one). Its rows come in the
   * stream's frames while a consumer is connected. A 400 for a table not in
   * the stream, or one with no key to read it by.
   */
  async startBackfill(name: string, request: StartBackfill): Promise<BackfillBody> {
    const stream = await this.require(name, "Cannot backfill");
    const { pool, names } = this.#deps;
    await this.#assertBackfills();
    if (request.mode === "replace" && request.where.length > 0) {
      // The consumer drops its whole copy at a replace's `started`: a part of the table would not
      // fill it again.
      throw new InvalidRequestError(
        'Cannot backfill: a "replace" backfill copies the whole table, so it takes no "where"; ' +
          'use "upsert" to refresh some of its rows',
      );
    }
    // The request's table and filter resolved as a stream's are: the same names, the same grammar.
    const [asked] = (await resolveDefinition(
      pool,
      names.schema,
      [{ table: request.table, where: request.where }],
      stream.definition.operations,
      { action: "Cannot backfill", field: () => "" },
    )).tables;
    const table = stream.definition.tables.find((t) => t.oid === asked.oid);
    if (table === undefined) {
      throw new InvalidRequestError(
        `Cannot backfill: table ${asked.schema}.${asked.table} is not one of stream "${name}"'s tables`,
      );
    }
    await resolveBackfillTable(pool, table);
    const backfill = await this.#backfills.queue({
      stream: name,
      tableOid: table.oid,
      schema: asked.schema,
      table: asked.table,
      mode: request.mode,
      conditions: asked.where,
    });
    this.#wakers.wake(name);
    log.info(
      "backfill.queued",
      `backfill ${backfill.id} of ${asked.schema}.${asked.table} was queued`,
      {
        stream: name,
        backfill: backfill.id,
        mode: backfill.mode,
      },
    );
    return backfillBody(backfill);
  }

  /** How many backfills of each stream are not finished, by state (for `/metrics`). */
  unfinishedBackfills(): Promise<{ stream: string; state: string; count: number }[]> {
    return this.#backfills.unfinished();
  }

  /** The stream's backfills, oldest first (finished ones for a day). */
  async listBackfills(name: string): Promise<BackfillBody[]> {
    await this.require(name, "Cannot list backfills");
    return (await this.#backfills.list(name)).map(backfillBody);
  }

  /** Cancels a backfill of the stream: a 404 if there is no such one. */
  async cancelBackfill(name: string, id: string): Promise<BackfillBody> {
    await this.require(name, "Cannot cancel backfill");
    const backfill = await this.#backfills.cancel(name, id);
    if (backfill === undefined) {
      throw new NotFoundError(`Cannot cancel backfill: stream "${name}" has no backfill "${id}"`);
    }
    this.#wakers.wake(name);
    return backfillBody(backfill);
  }
}
