/**
 * Reading a backfill's chunks: a stream table resolved in the catalog as it
 * is now (its key, its columns, its name), then one chunk after another in
 * key order, each one short `SELECT … WHERE key > cursor AND filter ORDER
 * BY key LIMIT n` in a transaction of its own (no lock beyond its
 * `AccessShareLock` while it runs). Names come from the catalog, quoted by
 * PostgreSQL; the cursor and the filter's values are bound. Each row is
 * written as a `{"kind":"read"}` change with the encoders an insert's values
 * use, so a read row and an inserted one are the same bytes.
 * @module
 */

import type pg from "pg";
import { InvalidRequestError, NotFoundError } from "../errors.ts";
import { RAW_TEXT_TYPES } from "../postgres/database.ts";
import { conditionsSql } from "../replication/row_filter.ts";
import { encoderFor, JSON_NULL, type ValueEncoder } from "../replication/wal2json_value.ts";
import type { StoredCondition, StoredTable } from "../streams/stream_definition.ts";

/** Rows of a chunk, at most. */
export const DEFAULT_CHUNK_ROWS = 10_000;
/** Bytes of a chunk's changes, about, at most. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;
/** How long one chunk's read may take (and wait for its lock) before it is tried again. */
const STATEMENT_TIMEOUT = "60s";
const LOCK_TIMEOUT = "10s";

/** A stream table as a backfill reads it, resolved now. */
export interface BackfillTable {
  oid: number;
  schema: string;
  table: string;
  /** `schema.table`, quoted by PostgreSQL. */
  qualified: string;
  /** The key chunks are ordered and resumed by: the replica identity index, else the primary key. */
  key: { name: string; quoted: string; typeName: string }[];
  /** The columns written, in the stream's order. */
  columns: { name: string; quoted: string; typeOid: number; typeName: string }[];
  /** Every published column's name and type OID, sorted: what a change of shape changes. */
  shape: string;
  /** The columns that filters may name, quoted, by name. */
  quoted: Map<string, string>;
}

/** A column as the catalog queries below give it. */
interface ColumnRow {
  name: string;
  quoted: string;
  type_oid: number;
  type_name: string;
}

/** The shape of a table with columns `names` of types `types` (see {@link BackfillTable.shape}). */
export function shapeOf(names: readonly string[], types: readonly number[]): string {
  return JSON.stringify(names.map((n, i) => `${n}:${types[i]}`).sort());
}

/**
 * The stream table `stored` as it is now. A {@link NotFoundError} if it was
 * dropped; an {@link InvalidRequestError} if it has neither a replica
 * identity index nor a primary key (nothing to order chunks by, nor to
 * match the log's changes with).
 */
export async function resolveBackfillTable(
  pool: pg.Pool,
  stored: StoredTable,
): Promise<BackfillTable> {
  const { rows: [found] } = await pool.query<{ schema: string; table: string; qualified: string }>(
    `SELECT n.nspname::text AS schema, c.relname::text AS table,
            format('%I.%I', n.nspname, c.relname) AS qualified
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = $1`,
    [stored.oid],
  );
  if (found === undefined) {
    throw new NotFoundError(
      `Cannot backfill: table ${stored.schema}.${stored.table} of the stream no longer exists`,
    );
  }
  const { rows: all }: { rows: ColumnRow[] } = await pool.query<ColumnRow>(
    `SELECT attname::text AS name, format('%I', attname) AS quoted, atttypid::int AS type_oid,
            format_type(atttypid, atttypmod) AS type_name
       FROM pg_attribute
      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
      ORDER BY attnum`,
    [stored.oid],
  );
  const { rows: key }: { rows: ColumnRow[] } = await pool.query<ColumnRow>(
    `SELECT a.attname::text AS name, format('%I', a.attname) AS quoted, a.atttypid::int AS type_oid,
            format_type(a.atttypid, a.atttypmod) AS type_name
       FROM pg_class c
       JOIN pg_index i ON i.indrelid = c.oid
        AND (CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END)
       CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
      WHERE c.oid = $1
      ORDER BY k.n`,
    [stored.oid],
  );
  if (key.length === 0) {
    throw new InvalidRequestError(
      `Cannot backfill: table ${found.qualified} has neither a primary key nor a replica identity index to read it by`,
    );
  }
  const byName = new Map(all.map((c) => [c.name, c]));
  const written = stored.columns === null
    ? all
    : stored.columns.flatMap((name) => byName.has(name) ? [byName.get(name)!] : []);
  return {
    oid: stored.oid,
    schema: found.schema,
    table: found.table,
    qualified: found.qualified,
    key: key.map((k) => ({ name: k.name, quoted: k.quoted, typeName: k.type_name })),
    columns: written.map((c) => ({
      name: c.name,
      quoted: c.quoted,
      typeOid: c.type_oid,
      typeName: c.type_name,
    })),
    shape: shapeOf(all.map((c) => c.name), all.map((c) => c.type_oid)),
    quoted: new Map(all.map((c) => [c.name, c.quoted])),
  };
}

/** One chunk: its rows as `read` changes, each row's key, and where the next chunk starts. */
export interface Chunk {
  /** The `{"kind":"read"}` changes, in key order. */
  changes: string[];
  /** Each row's key (JSON of its key columns' text), by row. */
  keys: string[];
  /** The key of the chunk's last row: the next chunk's cursor (the same cursor if it has none). */
  lastKey: string[] | null;
  /** Whether the table has no rows after it. */
  last: boolean;
  /**
   * Transactions (low 32 bits of their xids) in progress for the read's
   * snapshot: one of them whose commit the log carries before the low
   * watermark is missing from the rows, and not in the window.
   */
  inProgress: number[];
}

/** How a chunk is read. */
export interface ChunkLimits {
  rows: number;
  bytes: number;
}

/** The key of a row of text values, as a string to compare the log's changes with. */
export function keyString(values: readonly (string | null)[]): string {
  return JSON.stringify(values);
}

/** `$n` for `value`, pushed onto `params`. */
function bind(params: unknown[], value: string): string {
  params.push(value);
  return `$${params.length}`;
}

/** A chunk's SQL: its key list, select list, and filter (its values pushed onto `params`). */
function chunkSql(
  table: BackfillTable,
  where: StoredCondition[],
  params: unknown[],
): { keyList: string; select: string; filter: string } {
  const filter = conditionsSql(
    where,
    (column) => table.quoted.get(column) ?? "NULL",
    (column) => where.find((c) => c.column === column)!.typeName,
    (value) => bind(params, value),
  );
  const keyList = table.key.map((k) => k.quoted).join(", ");
  const select = [...table.key.map((k) => k.quoted), ...table.columns.map((c) => c.quoted)]
    .join(", ");
  return { keyList, select, filter };
}

/** The planner's estimate of the rows of `table` that pass `where`: a backfill's size, for progress. */
export async function estimateRows(
  pool: pg.Pool,
  table: BackfillTable,
  where: StoredCondition[],
): Promise<number> {
  const params: unknown[] = [];
  const { filter } = chunkSql(table, where, params);
  const { rows: [row] } = await pool.query<{ "QUERY PLAN": [{ Plan: { "Plan Rows": number } }] }>(
    `EXPLAIN (FORMAT JSON) SELECT FROM ${table.qualified} WHERE ${filter}`,
    params,
  );
  return Math.round(row["QUERY PLAN"][0].Plan["Plan Rows"]);
}

/**
 * Reads the chunk of `table` after `cursor` (null: from the start) that
 * passes `where` (the stream's filter and the backfill's, together).
 */
export async function readChunk(
  pool: pg.Pool,
  table: BackfillTable,
  where: StoredCondition[],
  cursor: string[] | null,
  limits: ChunkLimits,
): Promise<Chunk> {
  const params: unknown[] = [limits.rows];
  const { keyList, select, filter } = chunkSql(table, where, params);
  const after = cursor === null
    ? "true"
    : `(${keyList}) > (${
      table.key.map((k, i) => `${bind(params, cursor[i])}::${k.typeName}`).join(", ")
    })`;
  const client = await pool.connect();
  let rows: (string | null)[][];
  let inProgress: number[];
  try {
    // One snapshot for both statements: the rows, and the transactions it does not see yet.
    await client.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    await client.query(
      `SET LOCAL statement_timeout = '${STATEMENT_TIMEOUT}'; SET LOCAL lock_timeout = '${LOCK_TIMEOUT}'`,
    );
    const { rows: [snapshot] } = await client.query<{ xids: string[] }>(
      `SELECT array(SELECT (x::text::int8 % 4294967296)::text
                      FROM pg_snapshot_xip(pg_current_snapshot()) x) AS xids`,
    );
    inProgress = snapshot.xids.map(Number);
    const result = await client.query({
      text:
        `SELECT ${select} FROM ${table.qualified} WHERE ${after} AND ${filter} ORDER BY ${keyList} LIMIT $1`,
      values: params,
      rowMode: "array",
      types: RAW_TEXT_TYPES,
    });
    await client.query("COMMIT");
    rows = result.rows as (string | null)[][];
  } catch (error) {
    await client.query("ROLLBACK").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
  return { ...encodeChunk(table, rows, cursor, limits), inProgress };
}

/** The rows of a chunk's read as changes, cut at `limits.bytes`. */
function encodeChunk(
  table: BackfillTable,
  rows: (string | null)[][],
  cursor: string[] | null,
  limits: ChunkLimits,
): Omit<Chunk, "inProgress"> {
  const keyCount = table.key.length;
  const encoders: ValueEncoder[] = table.columns.map((c) => encoderFor(c.typeOid));
  const head = `{"kind":"read","schema":${JSON.stringify(table.schema)},"table":${
    JSON.stringify(table.table)
  },"columnnames":[${table.columns.map((c) => JSON.stringify(c.name)).join(",")}],"columntypes":[${
    table.columns.map((c) => JSON.stringify(c.typeName)).join(",")
  }],"columnvalues":[`;
  const changes: string[] = [];
  const keys: string[] = [];
  let bytes = 0;
  let lastKey = cursor;
  for (const row of rows) {
    let change = head;
    for (let i = 0; i < encoders.length; i++) {
      const value = row[keyCount + i];
      change += (i === 0 ? "" : ",") + (value === null ? JSON_NULL : encoders[i](value));
    }
    change += "]}";
    const key = row.slice(0, keyCount);
    changes.push(change);
    keys.push(keyString(key));
    lastKey = key as string[];
    bytes += change.length + 1;
    if (bytes >= limits.bytes) break;
  }
  return {
    changes,
    keys,
    lastKey,
    last: changes.length === rows.length && rows.length < limits.rows,
  };
}
