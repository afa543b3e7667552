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
import type { PgConnection } from "../postgres/pg_connection.ts";
import { conditionsSql } from "../replication/row_filter.ts";
import { type ValueKind, valueKindOf } from "../replication/wal2json_value.ts";
import { fieldEnd, fieldText, writeField } from "../snapshots/copy_text_json.ts";
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
      WHERE c.oid = $1 AND k.n <= i.indnkeyatts
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
  /** The rows' `{"kind":"read"}` changes, in key order, as UTF-8 JSON, each followed by a comma. */
  bytes: Uint8Array;
  /** Where each row's change starts in {@link bytes}. */
  starts: number[];
  /** How many rows it has. */
  rows: number;
  /** Row `i`'s key (see {@link keyString}); made when asked (only rows the log changed need it). */
  keyAt(i: number): string;
  /** The key of the chunk's last row: the next chunk's cursor (the same cursor if it has none). */
  lastKey: string[] | null;
  /** Whether the table has no rows after it. */
  last: boolean;
  /** Rows PostgreSQL sent; more than the chunk's when it filled its bytes first. */
  rowsRead: number;
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

/** The planner's estimate of the rows of `table` that pass `where`: a backfill's size, for progress. */
export async function estimateRows(
  pool: pg.Pool,
  table: BackfillTable,
  where: StoredCondition[],
): Promise<number> {
  const params: string[] = [];
  const filter = conditionsSql(
    where,
    (column) => table.quoted.get(column) ?? "NULL",
    (column) => where.find((c) => c.column === column)!.typeName,
    (value) => `$${params.push(value)}`,
  );
  const { rows: [row] } = await pool.query<{ "QUERY PLAN": [{ Plan: { "Plan Rows": number } }] }>(
    `EXPLAIN (FORMAT JSON) SELECT FROM ${table.qualified} WHERE ${filter}`,
    params,
  );
  return Math.round(row["QUERY PLAN"][0].Plan["Plan Rows"]);
}

/**
 * A string as an SQL literal, under `standard_conforming_strings = on` (which
 * the read sets): quotes doubled, nothing else special. PostgreSQL text
 * cannot hold a NUL, and the connection's encoding is UTF-8.
 */
function literal(value: string): string {
  return `'${value.replaceAll("'", "''")}'`;
}

/**
 * Reads on `connection` the chunk of `table` after `cursor` (null: from the
 * start) that passes `where` (the stream's filter and the backfill's,
 * together): at most `limits.rows` rows (and about `limits.bytes` of
 * changes), in a `REPEATABLE READ` transaction of its own, by `COPY` (the
 * cheapest way out of PostgreSQL). `COPY` takes no parameters: the filter's
 * values (canonical text, from PostgreSQL's own casts) and the cursor's (key
 * values PostgreSQL wrote) are literals, cast to their column's type.
 */
export async function readChunk(
  connection: PgConnection,
  table: BackfillTable,
  where: StoredCondition[],
  cursor: string[] | null,
  limits: ChunkLimits,
): Promise<Chunk> {
  const filter = conditionsSql(
    where,
    (column) => table.quoted.get(column) ?? "NULL",
    (column) => where.find((c) => c.column === column)!.typeName,
    literal,
  );
  const keyList = table.key.map((k) => k.quoted).join(", ");
  const after = cursor === null
    ? "true"
    : `(${keyList}) > (${
      table.key.map((k, i) => `${literal(cursor[i])}::${k.typeName}`).join(", ")
    })`;
  const select = [...table.key.map((k) => k.quoted), ...table.columns.map((c) => c.quoted)]
    .join(", ");
  const rows = new ReadRows(table, limits.bytes);
  try {
    // One snapshot for both statements: the transactions it does not see yet, and the rows.
    const { rows: [[xids]] } = await connection.query(
      `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
       SET LOCAL standard_conforming_strings = on;
       SET LOCAL statement_timeout = '${STATEMENT_TIMEOUT}'; SET LOCAL lock_timeout = '${LOCK_TIMEOUT}';
       SELECT string_agg((x::text::int8 % 4294967296)::text, ',')
         FROM pg_snapshot_xip(pg_current_snapshot()) x`,
    );
    await connection.copyOut(
      `COPY (SELECT ${select} FROM ${table.qualified} WHERE ${after} AND ${filter} ORDER BY ${keyList} LIMIT ${limits.rows}) TO STDOUT`,
      (row) => rows.push(row),
    );
    // Not awaited: the next statement on the connection waits for it (a failure fails that one).
    connection.query("COMMIT").catch(() => {});
    const inProgress = xids === null ? [] : xids.split(",").map(Number);
    const included = rows.starts.length;
    return {
      bytes: rows.bytes,
      starts: rows.starts,
      rows: included,
      keyAt: (i) => keyString(rows.key(i)),
      lastKey: included > 0 ? rows.key(included - 1) : cursor,
      last: rows.read < limits.rows && included === rows.read,
      rowsRead: rows.read,
      inProgress,
    };
  } catch (error) {
    await connection.query("ROLLBACK").catch(() => {});
    throw error;
  }
}

const COMMA = 0x2c;
const NEWLINE = 0x0a;
const encoder = new TextEncoder();

/** COPY text rows (the key's columns, then the stream's) written as `read` changes, up to a size. */
class ReadRows {
  readonly #head: Uint8Array;
  readonly #kinds: ValueKind[];
  readonly #keyColumns: number;
  readonly #bytes: number;
  #out: Uint8Array;
  #used = 0;
  /** The key fields of every row, as COPY wrote them, and where each one ends in it. */
  #keys: Uint8Array = new Uint8Array(64 << 10);
  #keysUsed = 0;
  readonly #keyEnds: number[] = [];
  readonly starts: number[] = [];
  /** Rows received, whether they fitted or not. */
  read = 0;

  constructor(table: BackfillTable, bytes: number) {
    this.#head = encoder.encode(
      `{"kind":"read","schema":${JSON.stringify(table.schema)},"table":${
        JSON.stringify(table.table)
      },"columnnames":[${
        table.columns.map((c) => JSON.stringify(c.name)).join(",")
      }],"columntypes":[${
        table.columns.map((c) => JSON.stringify(c.typeName)).join(",")
      }],"columnvalues":[`,
    );
    this.#kinds = table.columns.map((c) => valueKindOf(c.typeOid));
    this.#keyColumns = table.key.length;
    this.#bytes = bytes;
    // Sized for a full chunk at once: growing it would copy it, and fault in fresh pages each time.
    this.#out = new Uint8Array(bytes + (64 << 10));
  }

  /** The changes written, each followed by a comma. */
  get bytes(): Uint8Array {
    return this.#out.subarray(0, this.#used);
  }

  /** Row `i`'s key: the text of each key column. */
  key(i: number): string[] {
    const key: string[] = [];
    let at = i === 0 ? 0 : this.#keyEnds[i * this.#keyColumns - 1];
    for (let k = 0; k < this.#keyColumns; k++) {
      const end = this.#keyEnds[i * this.#keyColumns + k];
      key.push(fieldText(this.#keys, at, end) ?? "");
      at = end;
    }
    return key;
  }

  /** One row: a CopyData payload, the fields tab-separated and a newline. */
  push(row: Uint8Array): void {
    this.read++;
    if (this.#used >= this.#bytes) return; // full: the next chunk starts with this row
    const end = row.length > 0 && row[row.length - 1] === NEWLINE ? row.length - 1 : row.length;
    let at = 0;
    for (let k = 0; k < this.#keyColumns; k++) {
      const stop = fieldEnd(row, at, end);
      if (this.#keysUsed + stop - at > this.#keys.length) {
        const grown = new Uint8Array(2 * (this.#keys.length + stop - at));
        grown.set(this.#keys.subarray(0, this.#keysUsed));
        this.#keys = grown;
      }
      for (let i = at; i < stop; i++) this.#keys[this.#keysUsed++] = row[i];
      this.#keyEnds.push(this.#keysUsed);
      at = stop + 1;
    }
    // A value grows at most six-fold (a control byte as \u00XX); commas and brackets besides.
    const need = this.#used + this.#head.length + 6 * row.length + 3 * this.#kinds.length + 8;
    if (need > this.#out.length) {
      const grown = new Uint8Array(Math.max(need, 2 * this.#out.length));
      grown.set(this.#out.subarray(0, this.#used));
      this.#out = grown;
    }
    const out = this.#out;
    let o = this.#used;
    this.starts.push(o);
    out.set(this.#head, o);
    o += this.#head.length;
    for (let i = 0; i < this.#kinds.length; i++) {
      if (i > 0) out[o++] = COMMA;
      const stop = fieldEnd(row, at, end);
      o = writeField(this.#kinds[i], row, at, stop, out, o);
      at = stop + 1;
    }
    out[o++] = 0x5d; // ]
    out[o++] = 0x7d; // }
    out[o++] = COMMA;
    this.#used = o;
  }
}
