/**
 * The slots this server creates: init (slot + exported snapshot), dropping
 * only the slots recorded as its own, and looking slots up for streaming.
 * @module
 */

import { errorMessage, log } from "../observability/log.ts";
import type pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { connect, SqlState, sqlState } from "../postgres/database.ts";
import { UnavailableError } from "../errors.ts";
import { type SchemaNames, syncPublication } from "../postgres/server_schema.ts";
import { generateSlotName, isValidSlotName } from "./slot_names.ts";
import type { SnapshotOwner, SnapshotStore } from "../snapshots/snapshot_store.ts";

/** A slot as `pg_replication_slots` shows it. */
export interface SlotInfo {
  slot_name: string;
  plugin: string | null;
  database: string | null;
  active_pid: number | null;
  confirmed_flush_lsn: string | null;
  /** Recorded by the server: created by pgdeltastream (by init, or for a v2 stream). */
  owned: boolean;
  /** Created by v1's init (and dropped by the next one). */
  v1: boolean;
  /** WAL from the confirmed position, and from the restart position, to the current one. */
  lag_bytes: number | null;
  retained_bytes: number | null;
  /** v1: seconds since a consumer was last connected, and when the WAL guard invalidated it. */
  idle_seconds: number | null;
  invalidated_at: Date | null;
}

/** `server_version_num` of the database `pool` reaches. */
async function serverVersion(pool: pg.Pool): Promise<number> {
  const { rows } = await pool.query<{ version: number }>(
    "SELECT current_setting('server_version_num')::int AS version",
  );
  return rows[0].version;
}

/** Whose snapshot a v1 slot's is, and what its reader does once it is gone. */
export function v1SnapshotOwner(slotName: string): SnapshotOwner {
  return { label: `slot "${slotName}"`, remedy: "call /v1/init for a new slot and snapshot" };
}

/** Called before a slot is dropped, to close the server's own stream on it. */
export type BeforeDrop = (slotName: string) => Promise<void>;

/** Creates, finds and drops the server's replication slots. */
export class SlotManager {
  readonly #db: DatabaseConfig;
  readonly #pool: pg.Pool;
  readonly #names: SchemaNames;
  readonly #snapshots: SnapshotStore;
  #initLock: Promise<unknown> = Promise.resolve();

  /** Manages slots in the database of `db`, recording them in `names.schema`. */
  constructor(db: DatabaseConfig, pool: pg.Pool, names: SchemaNames, snapshots: SnapshotStore) {
    this.#db = db;
    this.#pool = pool;
    this.#names = names;
    this.#snapshots = snapshots;
  }

  /**
   * The seed's init: drops the slots this server created before (never
   * another tool's), then creates a new slot whose exported snapshot is held
   * for the snapshot API. One init at a time.
   */
  init(beforeDrop: BeforeDrop): Promise<string> {
    const next = this.#initLock.then(async () => {
      await syncPublication(this.#pool, this.#names);
      for (const slot of await this.list()) {
        if (slot.v1) await this.drop(slot, beforeDrop);
      }
      return await this.#create();
    });
    this.#initLock = next.catch(() => {});
    return next;
  }

  /** Re-syncs the keyed publication with the tables' replica identities. */
  syncPublication(): Promise<void> {
    return syncPublication(this.#pool, this.#names);
  }

  /** Slots of this database, and whether this server created them (v1 slots and v2 streams'). */
  async list(): Promise<SlotInfo[]> {
    const { rows } = await this.#pool.query<SlotInfo>(
      `SELECT coalesce(s.slot_name, o.slot_name)::text AS slot_name, s.plugin::text, s.database::text,
              s.active_pid, s.confirmed_flush_lsn::text, o.slot_name IS NOT NULL AS owned,
              o.v1 IS TRUE AS v1,
              pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8 AS lag_bytes,
              pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::float8 AS retained_bytes,
              extract(epoch FROM now() - o.last_activity)::float8 AS idle_seconds,
              o.invalidated_at
         FROM (SELECT * FROM pg_replication_slots WHERE database = current_database()) s
         FULL JOIN (SELECT slot_name, true AS v1, last_activity, invalidated_at
                      FROM ${this.#names.schema}.slots
                    UNION ALL SELECT slot_name, false, NULL, NULL
                      FROM ${this.#names.schema}.streams) o
           ON o.slot_name = s.slot_name
        ORDER BY 1`,
    );
    return rows;
  }

  /** Whether the WAL guard invalidated the v1 slot `slotName`. */
  async isInvalidated(slotName: string): Promise<boolean> {
    const { rows } = await this.#pool.query(
      `SELECT 1 FROM ${this.#names.schema}.slots
        WHERE slot_name = $1 AND invalidated_at IS NOT NULL`,
      [slotName],
    );
    return rows.length > 0;
  }

  /**
   * Invalidates the v1 slot `slotName` (the WAL guard): records why, calls
   * `beforeDrop` (which closes its stream), releases its snapshot, drops it.
   */
  async invalidate(slotName: string, reason: string, beforeDrop: BeforeDrop): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#names.schema}.slots SET invalidated_at = now(), invalidation_reason = $2
        WHERE slot_name = $1 AND invalidated_at IS NULL`,
      [slotName, reason],
    );
    await beforeDrop(slotName);
    await this.#snapshots.release(slotName, `the slot was invalidated: ${reason}`);
    await this.dropSlot(slotName);
  }

  /**
   * Whether the v1 slot `slotName` was made and is gone (a failover to a
   * server that did not keep it): then it is invalidated now, with `reason`
   * made of where it is missing, and its consumer told 4410.
   */
  async invalidateIfLost(
    slotName: string,
    reason: (server: string | null) => string,
    beforeDrop: BeforeDrop,
  ): Promise<boolean> {
    const { rows: [row] } = await this.#pool.query<{ lost: boolean; server: string | null }>(
      `SELECT t.slot_ready AND s.slot_name IS NULL AS lost,
              host(inet_server_addr()) || ':' || inet_server_port() AS server
         FROM ${this.#names.schema}.slots t
         LEFT JOIN pg_replication_slots s ON s.slot_name = t.slot_name
        WHERE t.slot_name = $1 AND t.invalidated_at IS NULL`,
      [slotName],
    );
    if (row?.lost !== true) return false;
    const why = reason(row.server);
    log.error("stream.invalidated", `v1 slot "${slotName}" was invalidated: ${why}`, {
      slot: slotName,
    });
    await this.invalidate(slotName, why, beforeDrop);
    return true;
  }

  /** The slot named `slotName` in this database, or undefined. */
  async find(slotName: string): Promise<SlotInfo | undefined> {
    return (await this.list()).find((s) => s.slot_name === slotName && s.plugin !== null);
  }

  /** Closes the server's stream on `slot`, releases its snapshot, ends any other walsender on it, drops it. */
  async drop(slot: SlotInfo, beforeDrop: BeforeDrop): Promise<void> {
    await beforeDrop(slot.slot_name);
    await this.#snapshots.release(slot.slot_name, "a new init dropped its slot");
    if (slot.plugin !== null) await this.dropSlot(slot.slot_name);
    await this.#pool.query(`DELETE FROM ${this.#names.schema}.slots WHERE slot_name = $1`, [
      slot.slot_name,
    ]);
  }

  /**
   * Drops the replication slot `slotName` if it exists, ending any walsender
   * that still holds it (an old instance's, or a crashed one's) first.
   */
  async dropSlot(slotName: string): Promise<void> {
    await this.#pool.query(
      `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
        WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()`,
      [slotName],
    );
    await this.#dropWhenInactive(slotName);
  }

  async #dropWhenInactive(slotName: string): Promise<void> {
    for (let attempt = 0;; attempt++) {
      try {
        await this.#pool.query(
          "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
          [slotName],
        );
        return;
      } catch (error) {
        // The terminated walsender takes a moment to release the slot.
        if (sqlState(error) !== SqlState.ObjectInUse || attempt >= 50) throw error;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  async #create(): Promise<string> {
    for (let attempt = 0;; attempt++) {
      const slotName = generateSlotName();
      // Record ownership first: a crash between the two leaves a record without a slot (cleaned at the
      // next init), never a slot nobody knows is ours.
      const recorded = await this.#pool.query(
        `INSERT INTO ${this.#names.schema}.slots(slot_name) VALUES ($1) ON CONFLICT DO NOTHING`,
        [slotName],
      );
      if (recorded.rowCount === 0) continue;
      try {
        await this.createSlot(slotName, v1SnapshotOwner(slotName));
        return slotName;
      } catch (error) {
        await this.#forget(slotName);
        if (sqlState(error) === SqlState.DuplicateObject && attempt < 5) continue;
        if (sqlState(error) === SqlState.ConfigurationLimitExceeded) {
          throw new UnavailableError(
            `Cannot init: all replication slots are in use (${(error as Error).message}); ` +
              "drop unused slots or raise max_replication_slots",
          );
        }
        throw error;
      }
    }
  }

  /**
   * After a failed init: drops the slot if it was created, then its record.
   * If the drop fails too, the record stays, so that the next init drops the
   * slot: never a slot without a record.
   */
  async #forget(slotName: string): Promise<void> {
    try {
      await this.#dropWhenInactive(slotName);
      await this.#pool.query(`DELETE FROM ${this.#names.schema}.slots WHERE slot_name = $1`, [
        slotName,
      ]);
    } catch (error) {
      log.error("slot.left", `a failed init left slot "${slotName}"; the next init drops it`, {
        slot: slotName,
        error: errorMessage(error),
      });
    }
  }

  /**
   * Creates the logical slot `slotName` (pgoutput) with an exported snapshot,
   * held for `owner`. The name is the caller's, checked (`[a-z0-9_]`) and
   * recorded before this is called.
   */
  async createSlot(slotName: string, owner: SnapshotOwner | undefined): Promise<void> {
    if (!isValidSlotName(slotName)) throw new TypeError(`Not a slot name: ${slotName}`);
    const replication = await connect(this.#db, true);
    try {
      // PostgreSQL 17+: a failover slot, which a standby with sync_replication_slots keeps (the
      // option list cannot be mixed with the older EXPORT_SNAPSHOT keyword).
      const failover = await serverVersion(this.#pool) >= 170000;
      // The exported snapshot lives only while this connection stays idle: import it before anything else.
      // No owner: no snapshot is exported at all (the stream's first copy comes by backfills).
      const { rows } = await replication.query(
        failover
          ? `CREATE_REPLICATION_SLOT "${slotName}" LOGICAL pgoutput (SNAPSHOT '${
            owner ? "export" : "nothing"
          }', FAILOVER true)`
          : `CREATE_REPLICATION_SLOT "${slotName}" LOGICAL pgoutput ${
            owner ? "EXPORT_SNAPSHOT" : "NOEXPORT_SNAPSHOT"
          }`,
      );
      if (owner) await this.#snapshots.hold(slotName, owner, rows[0].snapshot_name);
      for (const table of ["slots", "streams"]) {
        await this.#pool.query(
          `UPDATE ${this.#names.schema}.${table} SET slot_ready = true WHERE slot_name = $1`,
          [slotName],
        );
      }
    } finally {
      await replication.end().catch(() => {});
    }
  }

  /**
   * PostgreSQL 17+: makes the server's own slots that are not failover slots
   * (made by an older version) failover slots, where no walsender holds them
   * (ALTER_REPLICATION_SLOT needs that); returns the ones changed.
   */
  async ensureFailover(): Promise<string[]> {
    if (await serverVersion(this.#pool) < 170000) return [];
    const { rows } = await this.#pool.query<{ slot_name: string }>(
      `SELECT s.slot_name::text FROM pg_replication_slots s
        WHERE s.slot_type = 'logical' AND NOT s.failover AND NOT s.active
          AND NOT coalesce((to_jsonb(s) ->> 'synced')::boolean, false)
          AND (s.slot_name IN (SELECT slot_name FROM ${this.#names.schema}.slots)
               OR s.slot_name IN (SELECT slot_name FROM ${this.#names.schema}.streams))`,
    );
    if (rows.length === 0) return [];
    const replication = await connect(this.#db, true);
    const changed: string[] = [];
    try {
      for (const { slot_name } of rows) {
        if (!isValidSlotName(slot_name)) continue;
        await replication.query(`ALTER_REPLICATION_SLOT "${slot_name}" (FAILOVER true)`).then(
          () => changed.push(slot_name),
          () => {}, // taken by a walsender meanwhile: next time
        );
      }
    } finally {
      await replication.end().catch(() => {});
    }
    return changed;
  }
}
