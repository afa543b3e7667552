/**
 * Changing a running stream's tables (`PATCH /v2/streams/{name}`) at one
 * position in the log. Three steps:
 *
 * 1. The stream's insert publication is widened to every table of the old
 *    definition and the new one, each unfiltered, and the change waits for
 *    the transactions that were open then to end: from here every row of
 *    those tables is in the log, whatever the definition (the decoder still
 *    filters by the old one).
 * 2. One transaction records the new definition, ends the backfills of the
 *    tables removed or changed, queues a `replace` backfill of each table
 *    added or changed, and writes a watermark (`{"switch": nonce}`) to the
 *    log. The decoder that reaches it checks its nonce in the store, records
 *    where it is, and carries the new definition from that transaction on;
 *    the transaction's frame carries `cancelled`, `removed` and `started`.
 *    Until the consumer is past it, every replication starts with the
 *    definition before it.
 * 3. The publication is set to the new definition exactly.
 * @module
 */

import type pg from "pg";
import { ConflictError, NotFoundError } from "../errors.ts";
import { parseLsn } from "../lsn.ts";
import { WATERMARK_PREFIX } from "../backfill/backfill_tap.ts";
import type { BackfillStore, StoredBackfill } from "../backfill/backfill_store.ts";
import type { StoredTable, StreamDefinition } from "./stream_definition.ts";
import type { StoredStream, StoredSwitch, StreamStore } from "./stream_store.ts";

/** How long a change waits for the transactions open when it widened the publication. */
export const OPEN_TRANSACTIONS_WAIT_MS = 30_000;

/** What a change of a definition does to each table. */
export interface DefinitionDiff {
  added: StoredTable[];
  removed: StoredTable[];
  /** In both, with other columns or another filter. */
  changed: StoredTable[];
}

/** What of a table a stream carries: its columns and its filter. */
function carried(table: StoredTable): string {
  return JSON.stringify([table.columns, table.where.map((c) => [c.column, c.op, c.values])]);
}

/** The tables `next` adds to `current`, removes from it, or carries otherwise. */
export function diffDefinitions(current: StreamDefinition, next: StreamDefinition): DefinitionDiff {
  const before = new Map(current.tables.map((t) => [t.oid, t]));
  const after = new Set(next.tables.map((t) => t.oid));
  return {
    added: next.tables.filter((t) => !before.has(t.oid)),
    removed: current.tables.filter((t) => !after.has(t.oid)),
    changed: next.tables.filter((t) =>
      before.has(t.oid) && carried(before.get(t.oid)!) !== carried(t)
    ),
  };
}

/** A random nonce: the change's watermark is told apart by it. */
function nonce(): string {
  return [...crypto.getRandomValues(new Uint8Array(12))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Whether the stream's consumer is past its last change (or it has none):
 * its slot confirmed a position after the change's transaction.
 */
export async function switchConfirmed(
  queryable: pg.Pool | pg.PoolClient,
  stream: StoredStream,
): Promise<boolean> {
  const change = stream.switch;
  if (change === null) return true;
  if (change.lsn === null) return false;
  const { rows: [slot] } = await queryable.query<{ confirmed: string | null }>(
    "SELECT confirmed_flush_lsn::text AS confirmed FROM pg_replication_slots WHERE slot_name = $1",
    [stream.slotName],
  );
  return slot === undefined || slot.confirmed === null ||
    parseLsn(slot.confirmed) > parseLsn(change.lsn);
}

/** A {@link ConflictError} while the stream's last change is still ahead of its consumer. */
export async function assertSwitchConfirmed(
  queryable: pg.Pool | pg.PoolClient,
  stream: StoredStream,
): Promise<void> {
  if (!await switchConfirmed(queryable, stream)) {
    throw new ConflictError(
      `Cannot change stream: its last change of tables or operations has not reached its ` +
        "consumer yet; try again once the consumer has acknowledged the frame that carries it",
    );
  }
}

/**
 * Runs `change` while holding the stream's change lock (an advisory lock,
 * so across instances too): one change of a stream at a time, from widening
 * its publication to setting it exactly; a {@link ConflictError} if another
 * holds it.
 */
export async function withChangeLock<T>(
  pool: pg.Pool,
  key: string,
  change: () => Promise<T>,
): Promise<T> {
  const client = await pool.connect();
  let broken: Error | undefined;
  try {
    const { rows: [{ locked }] } = await client.query<{ locked: boolean }>(
      "SELECT pg_try_advisory_lock(hashtext($1)) AS locked",
      [key],
    );
    if (!locked) {
      throw new ConflictError(
        "Cannot change stream: another change of it is under way; try again once it is answered",
      );
    }
    try {
      return await change();
    } finally {
      await client.query("SELECT pg_advisory_unlock(hashtext($1))", [key]).catch((error: Error) => {
        // A connection that may still hold the lock is not given back to the pool.
        broken = error;
      });
    }
  } finally {
    client.release(broken);
  }
}

/**
 * Waits until every transaction open now has ended (committed or rolled
 * back): a {@link ConflictError} naming them after `ms`.
 */
export async function waitForOpenTransactions(pool: pg.Pool, ms: number): Promise<void> {
  const { rows: [{ xids }] } = await pool.query<{ xids: string[] }>(
    "SELECT array(SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) x) AS xids",
  );
  const deadline = Date.now() + ms;
  for (let open = xids; open.length > 0;) {
    const { rows } = await pool.query<{ xid: string }>(
      `SELECT x AS xid FROM unnest($1::text[]) x WHERE pg_xact_status(x::xid8) = 'in progress'`,
      [open],
    );
    open = rows.map((r: { xid: string }) => r.xid);
    if (open.length === 0) return;
    if (Date.now() > deadline) {
      throw new ConflictError(
        `Cannot change stream: transaction ${open[0]} was open when the change began, and ` +
          `still is ${ms / 1000} s later (its rows would not be carried); retry once it ends`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** What the change made: its backfills, and whether there was anything to change. */
export interface ChangeOutcome {
  stream: StoredStream;
  started: StoredBackfill[];
}

/**
 * Step 2 of the module's documentation, in one transaction: a
 * {@link NotFoundError} if the stream is gone, a {@link ConflictError} while
 * its last change is still ahead of its consumer.
 */
export async function recordChange(
  pool: pg.Pool,
  streams: StreamStore,
  backfills: BackfillStore,
  name: string,
  definition: StreamDefinition,
  backfill: boolean,
): Promise<ChangeOutcome> {
  const client = await pool.connect();
  let broken: Error | undefined;
  try {
    await client.query("BEGIN");
    const stream = await streams.lockForChange(client, name);
    if (stream === undefined) {
      throw new NotFoundError(`Cannot change stream: stream "${name}" does not exist`);
    }
    await assertSwitchConfirmed(client, stream);
    const diff = diffDefinitions(stream.definition, definition);
    const ended = await backfills.endForChange(
      client,
      name,
      [...diff.removed, ...diff.changed].map((t) => t.oid),
      "the stream's definition of its table changed",
    );
    const started: StoredBackfill[] = [];
    if (backfill) {
      const backfilled = new Set([...diff.added, ...diff.changed]);
      for (const table of definition.tables.filter((t) => backfilled.has(t))) {
        started.push(
          await backfills.queueForChange(client, {
            stream: name,
            tableOid: table.oid,
            schema: table.schema,
            table: table.table,
            mode: "replace",
            conditions: [],
          }),
        );
      }
    }
    const change: StoredSwitch = {
      nonce: nonce(),
      previous: stream.definition,
      lsn: null,
      changes: [
        ...ended.map((b) =>
          JSON.stringify({
            kind: "backfill",
            id: b.id,
            schema: b.schema,
            table: b.table,
            state: "cancelled",
            reason: b.reason,
          })
        ),
        ...diff.removed.map((t) =>
          JSON.stringify({ kind: "backfill", state: "removed", schema: t.schema, table: t.table })
        ),
        ...started.map((b) =>
          JSON.stringify({
            kind: "backfill",
            id: b.id,
            schema: b.schema,
            table: b.table,
            state: "started",
            mode: b.mode,
          })
        ),
      ],
      started: started.map((b) => b.id),
      ended: ended.map((b) => b.id),
    };
    await streams.change(client, name, definition, change);
    await client.query("SELECT pg_logical_emit_message(true, $1, $2)", [
      WATERMARK_PREFIX,
      JSON.stringify({ stream: name, switch: change.nonce }),
    ]);
    await client.query("COMMIT");
    return { stream: { ...stream, definition, switch: change }, started };
  } catch (error) {
    // A connection whose transaction could not be rolled back is not given back to the pool.
    await client.query("ROLLBACK").catch((failed: Error) => (broken = failed));
    throw error;
  } finally {
    client.release(broken);
  }
}
