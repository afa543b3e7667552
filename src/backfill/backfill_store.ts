/**
 * Where backfills are kept: `pgdeltastream.backfills`, one row a backfill,
 * with the progress its consumer acknowledged (the last key of the last
 * acknowledged chunk, the rows sent up to it), so that a backfill resumes
 * after a restart or a reconnect with the first chunk not acknowledged.
 * @module
 */

import type pg from "pg";
import type { BackfillBody, BackfillMode, BackfillState } from "../protocol.ts";
import type { StoredCondition } from "../streams/stream_definition.ts";

/** Finished backfills are listed for this long. */
export const FINISHED_KEPT_HOURS = 24;

/** A backfill as stored. */
export interface StoredBackfill {
  id: string;
  stream: string;
  tableOid: number;
  schema: string;
  table: string;
  mode: BackfillMode;
  /** Conditions narrowing the stream's filter of the table (both apply). */
  conditions: StoredCondition[];
  state: BackfillState;
  /** The consumer acknowledged the `started` frame: it is not sent again. */
  startedAcked: boolean;
  /** The key (text of each key column) of the last row of the last acknowledged chunk; null: none yet. */
  cursor: string[] | null;
  rowsDone: number;
  rowsEstimated: number | null;
  /** The table's shape when it began (see `chunk_reader.ts`); null before. */
  shape: string | null;
  createdAt: Date;
  startedAt: Date | null;
  finishedAt: Date | null;
  /** Why the server cancelled it; null when a client did (or it was not cancelled). */
  reason: string | null;
}

interface Row {
  id: string;
  stream: string;
  table_oid: number;
  schema_name: string;
  table_name: string;
  mode: BackfillMode;
  conditions: StoredCondition[];
  state: BackfillState;
  started_acked: boolean;
  cursor: string[] | null;
  rows_done: string;
  rows_estimated: string | null;
  shape: string | null;
  created_at: Date;
  started_at: Date | null;
  finished_at: Date | null;
  reason: string | null;
}

function fromRow(row: Row): StoredBackfill {
  return {
    id: row.id,
    stream: row.stream,
    tableOid: Number(row.table_oid),
    schema: row.schema_name,
    table: row.table_name,
    mode: row.mode,
    conditions: row.conditions,
    state: row.state,
    startedAcked: row.started_acked,
    cursor: row.cursor,
    rowsDone: Number(row.rows_done),
    rowsEstimated: row.rows_estimated === null ? null : Number(row.rows_estimated),
    shape: row.shape,
    createdAt: row.created_at,
    startedAt: row.started_at,
    finishedAt: row.finished_at,
    reason: row.reason,
  };
}

/** A backfill as the API shows it. */
export function backfillBody(b: StoredBackfill): BackfillBody {
  return {
    id: b.id,
    table: `${b.schema}.${b.table}`,
    mode: b.mode,
    state: b.state,
    rowsDone: b.rowsDone,
    rowsEstimated: b.rowsEstimated,
    createdAt: b.createdAt.toISOString(),
    startedAt: b.startedAt?.toISOString() ?? null,
    finishedAt: b.finishedAt?.toISOString() ?? null,
    ...(b.reason === null ? {} : { reason: b.reason }),
  };
}

/** What a new backfill is. */
export interface NewBackfill {
  stream: string;
  tableOid: number;
  schema: string;
  table: string;
  mode: BackfillMode;
  conditions: StoredCondition[];
}

/** A backfill's id: `bf_` and 12 random hex digits. */
function newId(): string {
  return "bf_" + [...crypto.getRandomValues(new Uint8Array(6))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** The backfills table of the server's schema. */
export class BackfillStore {
  readonly #pool: pg.Pool;
  readonly #table: string;

  /** Keeps backfills in `${schema}.backfills` through `pool`. */
  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#table = `${schema}.backfills`;
  }

  /**
   * Queues a backfill, unless one of the same table of the stream is queued
   * already (at most one per table waits): then that one takes the new one
   * in and is answered. It becomes a `replace` if either is one, and reads
   * the whole table unless both read the same rows, so that it does at least
   * what each of them asked.
   */
  async queue(backfill: NewBackfill): Promise<StoredBackfill> {
    const { rows } = await this.#pool.query<Row>(
      `WITH queued AS (
         SELECT * FROM ${this.#table} WHERE stream = $2 AND table_oid = $3 AND state = 'queued'
          ORDER BY created_at LIMIT 1 FOR UPDATE),
       joined AS (
         UPDATE ${this.#table} b
            SET mode = CASE WHEN q.mode = 'replace' OR $6 = 'replace' THEN 'replace' ELSE 'upsert' END,
                conditions = CASE WHEN q.conditions = $7::jsonb THEN q.conditions ELSE '[]' END
           FROM queued q WHERE b.id = q.id
         RETURNING b.*),
       made AS (
         INSERT INTO ${this.#table}(id, stream, table_oid, schema_name, table_name, mode, conditions)
         SELECT $1, $2, $3, $4, $5, $6, $7 WHERE NOT EXISTS (SELECT 1 FROM queued)
         RETURNING *)
       SELECT * FROM made UNION ALL SELECT * FROM joined`,
      [
        newId(),
        backfill.stream,
        backfill.tableOid,
        backfill.schema,
        backfill.table,
        backfill.mode,
        JSON.stringify(backfill.conditions),
      ],
    );
    // Finished ones are kept for a day.
    await this.#pool.query(
      `DELETE FROM ${this.#table} WHERE stream = $1 AND finished_at < now() - make_interval(hours => $2)`,
      [backfill.stream, FINISHED_KEPT_HOURS],
    );
    return fromRow(rows[0]);
  }

  /**
   * Queues, on `client` in a change of the stream's definition, a backfill
   * whose `started` that change's frame carries.
   */
  async queueForChange(client: pg.PoolClient, backfill: NewBackfill): Promise<StoredBackfill> {
    const { rows } = await client.query<Row>(
      `INSERT INTO ${this.#table}(id, stream, table_oid, schema_name, table_name, mode, conditions)
       VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *`,
      [
        newId(),
        backfill.stream,
        backfill.tableOid,
        backfill.schema,
        backfill.table,
        backfill.mode,
        JSON.stringify(backfill.conditions),
      ],
    );
    return fromRow(rows[0]);
  }

  /**
   * Ends, on `client` in a change of the stream's definition, its unfinished
   * backfills of the tables `oids`: cancelled, for `reason`.
   */
  async endForChange(
    client: pg.PoolClient,
    stream: string,
    oids: number[],
    reason: string,
  ): Promise<StoredBackfill[]> {
    const { rows } = await client.query<Row>(
      `UPDATE ${this.#table} SET state = 'cancelled', finished_at = now(), reason = $3
        WHERE stream = $1 AND table_oid = ANY ($2::oid[]) AND state IN ('queued', 'running', 'cancelling')
       RETURNING *`,
      [stream, oids, reason],
    );
    return rows.map(fromRow);
  }

  /** The backfills of `stream`, oldest first: unfinished ones, and those finished within a day. */
  async list(stream: string): Promise<StoredBackfill[]> {
    const { rows } = await this.#pool.query<Row>(
      `SELECT * FROM ${this.#table}
        WHERE stream = $1 AND (finished_at IS NULL OR finished_at >= now() - make_interval(hours => $2))
        ORDER BY created_at, id`,
      [stream, FINISHED_KEPT_HOURS],
    );
    return rows.map(fromRow);
  }

  /** How many backfills of each stream are not finished, by state (for `/metrics`). */
  async unfinished(): Promise<{ stream: string; state: string; count: number }[]> {
    const { rows } = await this.#pool.query<{ stream: string; state: string; count: number }>(
      `SELECT stream, state, count(*)::int AS count FROM ${this.#table}
        WHERE state IN ('queued', 'running', 'cancelling') GROUP BY stream, state`,
    );
    return rows;
  }

  /** The backfill `id` of `stream`, or undefined. */
  async get(stream: string, id: string): Promise<StoredBackfill | undefined> {
    const { rows } = await this.#pool.query<Row>(
      `SELECT * FROM ${this.#table} WHERE stream = $1 AND id = $2`,
      [stream, id],
    );
    return rows[0] && fromRow(rows[0]);
  }

  /**
   * The next backfill of `stream` to work on, but those of `except`: one
   * being cancelled, running or queued, oldest first.
   */
  async next(stream: string, except: string[] = []): Promise<StoredBackfill | undefined> {
    const { rows } = await this.#pool.query<Row>(
      `SELECT * FROM ${this.#table} WHERE stream = $1 AND state IN ('cancelling', 'running', 'queued')
          AND id <> ALL ($2::text[])
        ORDER BY state = 'queued', created_at, id LIMIT 1`,
      [stream, except],
    );
    return rows[0] && fromRow(rows[0]);
  }

  /** The backfill begins: running, with the table's estimated size and its shape. */
  async begin(id: string, rowsEstimated: number, shape: string): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table} SET state = 'running', started_at = coalesce(started_at, now()),
              rows_estimated = $2, shape = $3
        WHERE id = $1 AND state IN ('queued', 'running')`,
      [id, rowsEstimated, shape],
    );
  }

  /**
   * Records what the consumer acknowledged: `started`, and the chunks up to
   * `cursor` with `rowsDone` rows; `done` when the last one was.
   */
  async progress(
    id: string,
    progress: { startedAcked: boolean; cursor: string[] | null; rowsDone: number; done: boolean },
  ): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table} SET started_acked = $2, cursor = $3, rows_done = $4,
              state = CASE WHEN $5 THEN 'done' ELSE state END,
              finished_at = CASE WHEN $5 THEN now() ELSE finished_at END
        WHERE id = $1 AND state IN ('queued', 'running', 'cancelling')`,
      [
        id,
        progress.startedAcked,
        JSON.stringify(progress.cursor),
        progress.rowsDone,
        progress.done,
      ],
    );
  }

  /**
   * Cancels the backfill `id`: a queued one at once; a running one is
   * `cancelling` until its `cancelled` frame is acknowledged. Undefined if
   * there is no such backfill. `reason`: why the server cancels it.
   */
  async cancel(stream: string, id: string, reason?: string): Promise<StoredBackfill | undefined> {
    const { rows } = await this.#pool.query<Row>(
      `UPDATE ${this.#table}
          SET state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE 'cancelling' END,
              finished_at = CASE WHEN state = 'queued' THEN now() END,
              reason = coalesce($3, reason)
        WHERE stream = $1 AND id = $2 AND state IN ('queued', 'running')
        RETURNING *`,
      [stream, id, reason ?? null],
    );
    return rows[0] ? fromRow(rows[0]) : await this.get(stream, id);
  }

  /** The `cancelled` frame of the backfill was acknowledged. */
  async cancelled(id: string): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table} SET state = 'cancelled', finished_at = now()
        WHERE id = $1 AND state IN ('running', 'cancelling')`,
      [id],
    );
  }

  /** The stream got a new slot: its consumer's copy starts again, so do its unfinished backfills. */
  async restart(stream: string): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table}
          SET state = CASE WHEN state = 'cancelling' THEN 'cancelled' ELSE 'queued' END,
              finished_at = CASE WHEN state = 'cancelling' THEN now() END,
              started_acked = false, cursor = NULL, rows_done = 0, shape = NULL
        WHERE stream = $1 AND state IN ('running', 'cancelling')`,
      [stream],
    );
  }
}
