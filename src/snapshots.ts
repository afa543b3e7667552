/**
 * Exported snapshots, kept alive. PostgreSQL keeps a slot's exported snapshot
 * only while the replication connection that created it stays idle, so each
 * one is imported at once into a `REPEATABLE READ` transaction held on its own
 * connection, until the next init, its time-to-live, or shutdown.
 * @module
 */

import type pg from "pg";
import type { DatabaseConfig } from "./config.ts";
import { connect } from "./database.ts";
import { HttpError } from "./http_error.ts";

/** Snapshot names as `pg_export_snapshot()` makes them, e.g. `00000003-0000001B-1`. */
const SNAPSHOT_NAME = /^[0-9A-F]+-[0-9A-F]+(-[0-9]+)?$/;

/** One imported snapshot: a connection inside the transaction that holds it. */
export class HeldSnapshot {
  readonly slotName: string;
  readonly #client: pg.Client;
  #queue: Promise<unknown> = Promise.resolve();
  #lost: string | undefined;

  /** Wraps `client`, already inside the snapshot's transaction. */
  constructor(slotName: string, client: pg.Client) {
    this.slotName = slotName;
    this.#client = client;
    client.on("end", () => this.#lost ??= "its database connection closed");
  }

  /** Why the snapshot can no longer be read, or undefined while it can. */
  get lost(): string | undefined {
    return this.#lost;
  }

  /**
   * Runs `work` inside the snapshot's transaction, one request at a time,
   * behind a savepoint: a failing query (say, an unsortable column) rolls
   * back to it instead of aborting the transaction that holds the snapshot.
   */
  run<T>(work: (client: pg.Client) => Promise<T>): Promise<T> {
    const next = this.#queue.then(async () => {
      await this.#client.query("SAVEPOINT request");
      try {
        const result = await work(this.#client);
        await this.#client.query("RELEASE SAVEPOINT request");
        return result;
      } catch (error) {
        await this.#client.query("ROLLBACK TO SAVEPOINT request").catch(() => {});
        throw error;
      }
    });
    this.#queue = next.catch(() => {});
    return next;
  }

  /** Ends the transaction and the connection. */
  async release(reason: string): Promise<void> {
    this.#lost ??= reason;
    await this.#queue;
    await this.#client.query("ROLLBACK").catch(() => {});
    await this.#client.end().catch(() => {});
  }
}

/** Detail of the "release" event a {@link SnapshotStore} dispatches. */
export interface ReleaseDetail {
  slotName: string;
  reason: string;
}

/**
 * The snapshots this server holds, by slot name, each released after its
 * time-to-live. Dispatches a `CustomEvent<ReleaseDetail>` "release" when one goes.
 */
export class SnapshotStore extends EventTarget implements AsyncDisposable {
  readonly #db: DatabaseConfig;
  readonly #ttlMs: number;
  readonly #held = new Map<
    string,
    { snapshot: HeldSnapshot; timer: ReturnType<typeof setTimeout> }
  >();
  /** Why a slot's snapshot went away, for a precise 410 message. */
  readonly #gone = new Map<string, string>();

  /** Holds snapshots on connections to `db` for `ttlSeconds` each. */
  constructor(db: DatabaseConfig, ttlSeconds: number) {
    super();
    this.#db = db;
    this.#ttlMs = ttlSeconds * 1000;
  }

  /** Imports `snapshotName` (exported by the slot's creation) into a new held transaction. */
  async hold(slotName: string, snapshotName: string): Promise<void> {
    if (!SNAPSHOT_NAME.test(snapshotName)) {
      throw new TypeError(
        `Unexpected snapshot name from PostgreSQL: ${JSON.stringify(snapshotName)}`,
      );
    }
    const client = await connect(this.#db);
    try {
      await client.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
      // SET TRANSACTION SNAPSHOT takes no parameters; the name was checked against the pattern above.
      await client.query(`SET TRANSACTION SNAPSHOT '${snapshotName}'`);
    } catch (error) {
      await client.end().catch(() => {});
      throw error;
    }
    const snapshot = new HeldSnapshot(slotName, client);
    const timer = setTimeout(() => {
      void this.release(slotName, `it expired after its time-to-live of ${this.#ttlMs / 1000} s`);
    }, this.#ttlMs);
    Deno.unrefTimer(Number(timer));
    this.#held.set(slotName, { snapshot, timer });
    this.#gone.delete(slotName);
  }

  /** The held snapshot of `slotName`; a 410 `HttpError` saying why when there is none. */
  get(slotName: string): HeldSnapshot {
    const entry = this.#held.get(slotName);
    const why = entry?.snapshot.lost ?? (entry ? undefined : this.#gone.get(slotName));
    if (entry !== undefined && why === undefined) return entry.snapshot;
    throw new HttpError(
      410,
      `Cannot read snapshot: the snapshot of slot "${slotName}" is no longer available (${
        why ?? "this server did not create it, or restarted since"
      }); call /v1/init for a new slot and snapshot`,
    );
  }

  /** Whether a snapshot of `slotName` is held (even if its connection has since failed). */
  has(slotName: string): boolean {
    return this.#held.has(slotName);
  }

  /** Names of the slots whose snapshots are held. */
  slots(): string[] {
    return [...this.#held.keys()];
  }

  /** Releases the snapshot of `slotName`, remembering `reason` for later requests. */
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

  /** Releases every snapshot. */
  async [Symbol.asyncDispose](): Promise<void> {
    await Promise.all(this.slots().map((s) => this.release(s, "the server shut down")));
  }
}
