/**
 * Exported snapshots, kept alive without holding locks. PostgreSQL keeps a
 * slot's exported snapshot only while the replication connection that
 * created it stays idle, so each one is imported at once into a
 * `REPEATABLE READ` transaction on a connection of its own (the holder),
 * which exports it again with `pg_export_snapshot()` and then reads nothing:
 * it holds no lock on any table. Every read imports that snapshot into a
 * short transaction of its own, reads, and ends, as `pg_dump --jobs` does;
 * so DDL never waits behind a held snapshot, only (briefly) behind a read in
 * progress, and reads of one snapshot run in parallel.
 * @module
 */

import type pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { connect, createPool } from "../postgres/database.ts";
import { GoneError, UnavailableError } from "../errors.ts";

/** Snapshot names as `pg_export_snapshot()` makes them, e.g. `00000003-0000001B-1`. */
const SNAPSHOT_NAME = /^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$/;

/** Checks a snapshot name from PostgreSQL before it goes into `SET TRANSACTION SNAPSHOT` (which takes no parameters). */
function checkedSnapshotName(name: unknown): string {
  if (typeof name !== "string" || !SNAPSHOT_NAME.test(name)) {
    throw new TypeError(`Unexpected snapshot name from PostgreSQL: ${JSON.stringify(name)}`);
  }
  return name;
}

/** One read transaction in progress; aborted when its snapshot is released. */
interface ActiveRead {
  abort(reason: string): void;
}

/** Names the snapshot in the message of a read it cut off. */
export class SnapshotReleasedError extends Error {
  /** Creates the error for a read of `slotName`'s snapshot, released for `reason`. */
  constructor(slotName: string, reason: string) {
    super(`the snapshot of slot "${slotName}" was released (${reason})`);
    this.name = "SnapshotReleasedError";
  }
}

/** Whose snapshot it is and what to do once it is gone, for the messages of a 410. */
export interface SnapshotOwner {
  /** E.g. `slot "delta_x1"` or `stream "orders"`. */
  label: string;
  /** What to do for a new snapshot, e.g. `call /v1/init for a new slot and snapshot`. */
  remedy: string;
}

/** The error for a snapshot of `owner` that is gone, for `reason`. */
function snapshotGone(owner: SnapshotOwner, reason: string): GoneError {
  return new GoneError(
    `Cannot read snapshot: the snapshot of ${owner.label} is no longer available (${reason}); ${owner.remedy}`,
  );
}

/** One held snapshot: the holder's connection, and the reads in progress on it. */
export class HeldSnapshot {
  readonly slotName: string;
  readonly owner: SnapshotOwner;
  /** What readers import: the snapshot as the holder exported it. */
  readonly #id: string;
  readonly #holder: pg.Client;
  readonly #readers: pg.Pool;
  readonly #active = new Set<ActiveRead>();
  #lost: string | undefined;

  private constructor(
    slotName: string,
    owner: SnapshotOwner,
    id: string,
    holder: pg.Client,
    readers: pg.Pool,
  ) {
    this.slotName = slotName;
    this.owner = owner;
    this.#id = id;
    this.#holder = holder;
    this.#readers = readers;
    holder.on("end", () => this.#lost ??= "its database connection closed");
  }

  /** Imports `exported` (a slot's snapshot) into a new holder that re-exports it for `readers`. */
  static async hold(
    db: DatabaseConfig,
    readers: pg.Pool,
    slotName: string,
    owner: SnapshotOwner,
    exported: string,
  ): Promise<HeldSnapshot> {
    const name = checkedSnapshotName(exported);
    const holder = await connect(db);
    try {
      await holder.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
      await holder.query(`SET TRANSACTION SNAPSHOT '${name}'`);
      const { rows } = await holder.query<{ id: string }>("SELECT pg_export_snapshot() AS id");
      return new HeldSnapshot(slotName, owner, checkedSnapshotName(rows[0].id), holder, readers);
    } catch (error) {
      await holder.end().catch(() => {});
      throw error;
    }
  }

  /** Why the snapshot can no longer be read, or undefined while it can. */
  get lost(): string | undefined {
    return this.#lost;
  }

  /** What another transaction imports (`SET TRANSACTION SNAPSHOT`) to read in this snapshot too. */
  get id(): string {
    return this.#id;
  }

  /**
   * Runs `work` in a transaction of its own that sees this snapshot, then
   * ends it (and with it every lock the work took). If the snapshot is
   * released meanwhile, the transaction is cut off: its connection is
   * closed, `work`'s queries fail, and `signal` aborts with a
   * {@link SnapshotReleasedError} (for connections of the work's own).
   */
  async read<T>(work: (client: pg.PoolClient, signal: AbortSignal) => Promise<T>): Promise<T> {
    if (this.#lost !== undefined) throw snapshotGone(this.owner, this.#lost);
    let client: pg.PoolClient;
    try {
      client = await this.#readers.connect();
    } catch (error) {
      if (this.#lost !== undefined) throw snapshotGone(this.owner, this.#lost);
      if (!/timeout exceeded when trying to connect/.test((error as Error).message)) throw error;
      // The pool's wait ran out: every reader connection is busy (exports, say).
      throw new UnavailableError(
        "Cannot read snapshot: no snapshot reader connection was free in time (they are busy " +
          "with other reads and exports; SNAPSHOT_READERS sets how many); retry shortly",
      );
    }
    // Released while this read waited for a connection: answer as if it came after.
    if (this.#lost !== undefined) {
      client.release();
      throw snapshotGone(this.owner, this.#lost);
    }
    const controller = new AbortController();
    let aborted: string | undefined;
    const active: ActiveRead = {
      abort: (reason) => {
        if (aborted !== undefined) return;
        aborted = reason;
        controller.abort(new SnapshotReleasedError(this.slotName, reason));
        client.release(new Error(`snapshot released: ${reason}`)); // closes the connection
      },
    };
    this.#active.add(active);
    try {
      await client.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
      await client.query(`SET TRANSACTION SNAPSHOT '${this.#id}'`);
      const result = await work(client, controller.signal);
      await client.query("COMMIT");
      return result;
    } catch (error) {
      if (aborted !== undefined) throw snapshotGone(this.owner, aborted);
      await client.query("ROLLBACK").catch(() => {});
      throw error;
    } finally {
      this.#active.delete(active);
      if (aborted === undefined) client.release();
    }
  }

  /**
   * Ends the holder's transaction and cuts off every read in progress; never
   * waits for a client (a stalled export reader, say).
   */
  async release(reason: string): Promise<void> {
    this.#lost ??= reason;
    for (const active of this.#active) active.abort(reason);
    this.#active.clear();
    await this.#holder.query("ROLLBACK").catch(() => {});
    await this.#holder.end().catch(() => {});
  }
}

/** Detail of the "release" event a {@link SnapshotStore} dispatches. */
export interface ReleaseDetail {
  slotName: string;
  reason: string;
}

/** How many connections snapshot reads share, and how long a read waits for one. */
export interface ReaderPoolOptions {
  /** Connections shared by every held snapshot's reads (an export holds one throughout). */
  readers: number;
  /** How long a read waits for a free connection before it is answered 503. */
  waitMs: number;
}

/** Eight connections; a read waits up to 10 s for one. */
const DEFAULT_READER_POOL: ReaderPoolOptions = { readers: 8, waitMs: 10_000 };

/**
 * The snapshots this server holds, by slot name, each released after its
 * time-to-live. Dispatches a `CustomEvent<ReleaseDetail>` "release" when one goes.
 */
export class SnapshotStore extends EventTarget implements AsyncDisposable {
  readonly #db: DatabaseConfig;
  readonly #ttlMs: number;
  readonly #readers: pg.Pool;
  readonly #held = new Map<
    string,
    { snapshot: HeldSnapshot; timer: ReturnType<typeof setTimeout>; expiresAt: Date }
  >();
  /** Why a slot's snapshot went away, for a precise 410 message. */
  readonly #gone = new Map<string, string>();

  /** Holds snapshots on connections to `db` for `ttlSeconds` each. */
  constructor(db: DatabaseConfig, ttlSeconds: number, pool = DEFAULT_READER_POOL) {
    super();
    this.#db = db;
    this.#ttlMs = ttlSeconds * 1000;
    this.#readers = createPool(db, pool.readers, pool.waitMs);
  }

  /** Imports `snapshotName` (exported by the slot's creation) and holds it for `owner`. */
  async hold(slotName: string, owner: SnapshotOwner, snapshotName: string): Promise<void> {
    const snapshot = await HeldSnapshot.hold(
      this.#db,
      this.#readers,
      slotName,
      owner,
      snapshotName,
    );
    const timer = setTimeout(() => {
      void this.release(slotName, `it expired after its time-to-live of ${this.#ttlMs / 1000} s`);
    }, this.#ttlMs);
    Deno.unrefTimer(Number(timer));
    this.#held.set(slotName, { snapshot, timer, expiresAt: new Date(Date.now() + this.#ttlMs) });
    this.#gone.delete(slotName);
  }

  /** The held snapshot of `slotName`; a {@link GoneError} saying why (to `owner`) when there is none. */
  get(slotName: string, owner: SnapshotOwner): HeldSnapshot {
    const entry = this.#held.get(slotName);
    const why = entry?.snapshot.lost ?? (entry ? undefined : this.#gone.get(slotName));
    if (entry !== undefined && why === undefined) return entry.snapshot;
    throw snapshotGone(owner, why ?? "this server did not create it, or restarted since");
  }

  /** When the snapshot of `slotName` will be released, if it is held. */
  expiresAt(slotName: string): Date | undefined {
    return this.#held.get(slotName)?.expiresAt;
  }

  /** Whether a snapshot of `slotName` is held (even if its connection has since failed). */
  has(slotName: string): boolean {
    return this.#held.has(slotName);
  }

  /** Snapshot reads waiting for a free reader connection now. */
  get readsWaiting(): number {
    return this.#readers.waitingCount;
  }

  /** Names of the slots whose snapshots are held. */
  slots(): string[] {
    return [...this.#held.keys()];
  }

  /** Releases the snapshot of `slotName` at once, remembering `reason` for later requests. */
  async release(slotName: string, reason: string): Promise<void> {
    const entry = this.#held.get(slotName);
    if (entry === undefined) return;
    this.#held.delete(slotName);
    this.#gone.set(slotName, reason);
    // Remember reasons for the recent slots only.
    if (this.#gone.size > 256) this.#gone.delete(this.#gone.keys().next().value!);
    clearTimeout(entry.timer);
    await entry.snapshot.release(reason);
    this.dispatchEvent(new CustomEvent<ReleaseDetail>("release", { detail: { slotName, reason } }));
  }

  /** Releases every snapshot and closes the readers' connections. */
  async [Symbol.asyncDispose](): Promise<void> {
    await Promise.all(this.slots().map((s) => this.release(s, "the server shut down")));
    await this.#readers.end();
  }
}
