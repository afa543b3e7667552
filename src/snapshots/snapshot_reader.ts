/**
 * Reading a held snapshot: resolves the table and sort column against the
 * catalog as of the snapshot, locks the table for the read and checks that
 * it is still what the snapshot saw, then reads one page of rows. Request
 * input never becomes SQL text: names are looked up and quoted by
 * PostgreSQL itself, values are bound.
 * @module
 */

import type pg from "pg";
import { ConflictError, ForbiddenError, InvalidRequestError, NotFoundError } from "../errors.ts";
import { RAW_TEXT_TYPES, SqlState, sqlState } from "../postgres/database.ts";
import type { SortOrder } from "../protocol.ts";
import { type ResolvedTable, resolveTable } from "../postgres/resolve_table.ts";
import { type Condition, conditionsSql } from "../replication/row_filter.ts";
import type { HeldSnapshot } from "./snapshot_store.ts";

/** What a snapshot read needs besides the request: the snapshot, the database as it is now, and what to hide. */
export interface SnapshotSource {
  snapshot: HeldSnapshot;
  /** Connections outside any snapshot: the table as it is now, to compare. */
  current: pg.Pool;
  /** The server's own schema, never readable through the API. */
  ownSchema: string;
  /** What a reader whose table changed since the snapshot should do, e.g. "call /v1/init". */
  remedy: string;
  /** What the reader may see, for a stream's snapshot; none: every table whole (v1). */
  view?: SnapshotView;
  /** Told how many rows each page or export chunk returned (for the metrics). */
  countRows?: (rows: number) => void;
}

/** A validated page request (the export takes only `table` and `orderBy`). */
export interface PageRequest {
  table: string;
  offset: number;
  limit: number;
  orderBy?: { column: string; order: SortOrder };
  /** Keyset paging: rows after this value of the (single) sort column. */
  after?: string;
}

/**
 * A table's physical storage and columns as the querying transaction sees
 * them: the relfilenode of it (or of each of its partitions), which TRUNCATE
 * and every rewrite (VACUUM FULL, CLUSTER, a rewriting ALTER TABLE) replace;
 * and each column by number, with its name and type. Run inside a read it
 * describes the table as of the snapshot; on a fresh connection, as it is now.
 */
const TABLE_SHAPE = `
  WITH RECURSIVE tree(oid) AS (
    SELECT $1::oid UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
  SELECT (SELECT json_agg(json_build_array(c.oid, c.relfilenode) ORDER BY c.oid)
            FROM tree JOIN pg_class c ON c.oid = tree.oid WHERE c.relkind <> 'p') AS storage,
         (SELECT json_object_agg(a.attnum, json_build_array(a.attname, a.atttypid))
            FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
         to_regclass($2)::oid AS named`;

interface TableShape {
  storage: [number, number][] | null;
  columns: Record<string, [string, number]> | null;
  named: number | null;
}

/**
 * Locks `table` for this read (until its transaction ends), then checks
 * that the table is still what the snapshot saw. TRUNCATE and rewrites are
 * not MVCC-safe: under an old snapshot a truncated table reads as empty. So a
 * table truncated, rewritten, dropped or renamed after the snapshot, or one
 * of whose columns was dropped, renamed or retyped, answers 409 instead of
 * rows that differ from the database as of the snapshot. Columns added since
 * are fine: they are not in the snapshot's rows, as they were not in the table.
 */
async function lockUnchanged(
  client: pg.PoolClient,
  source: SnapshotSource,
  table: ResolvedTable,
): Promise<void> {
  const current = source.current;
  const changed = (what: string) =>
    new ConflictError(
      `Cannot read snapshot: ${what} after the snapshot was taken, so its rows as of the ` +
        `snapshot can no longer be read; a new snapshot is needed: ${source.remedy}`,
    );
  // Planning a scan takes the lock (and, for a partitioned table, locks its partitions).
  const locked = await client.query(`SELECT FROM ${table.qualified} LIMIT 0`).then(
    () => true,
    (error: unknown) => {
      if (sqlState(error) === SqlState.UndefinedTable) return false;
      throw error;
    },
  );
  if (!locked) throw changed(`table ${table.qualified} was dropped or renamed`);
  // Whatever changed the table committed before the lock was granted; from now on nothing can.
  const [then, now] = await Promise.all([
    client.query<TableShape>(TABLE_SHAPE, [table.oid, table.qualified]),
    current.query<TableShape>(TABLE_SHAPE, [table.oid, table.qualified]),
  ]);
  const before = then.rows[0];
  const after = now.rows[0];
  if (after.columns === null || after.named !== table.oid) {
    throw changed(`table ${table.qualified} was dropped or renamed`);
  }
  if (JSON.stringify(before.storage) !== JSON.stringify(after.storage)) {
    throw changed(
      `table ${table.qualified} was truncated or rewritten (TRUNCATE, VACUUM FULL, CLUSTER, ALTER TABLE)`,
    );
  }
  const columns: [string, [string, number]][] = Object.entries(before.columns ?? {});
  for (const [attnum, [name, type]] of columns) {
    const [nowName, nowType] = after.columns[attnum] ?? [];
    if (nowName !== name || nowType !== type) {
      throw changed(
        `column ${JSON.stringify(name)} of ${table.qualified} was dropped, renamed or retyped`,
      );
    }
  }
}

/** How rows are sorted: the ORDER BY clause, and what keyset paging and re-ordering may use. */
interface RowOrder {
  /** ` ORDER BY …`, or "" for relations with no stable order. */
  clause: string;
  /** True when the clause names only columns (so an outer query can repeat it). */
  byColumns: boolean;
  /** The single sort column, quoted, when there is exactly one: keyset paging's key. */
  keyset?: string;
  descending: boolean;
}

/**
 * The sort order: the requested column (checked and quoted), else the
 * primary key, else the replica identity's index, else physical order. Only
 * columns in `visible` (null: every column) can order or seek: sorting by a
 * column a reader may not see, then paging with `after`, would give its
 * values away; such a column is answered as one that does not exist.
 */
export async function sortOrder(
  client: pg.PoolClient,
  table: ResolvedTable,
  request: PageRequest,
  visible: string[] | null = null,
): Promise<RowOrder> {
  if (request.orderBy !== undefined) {
    const { rows } = await client.query<{ quoted: string }>(
      `SELECT format('%I', attname) AS quoted FROM pg_attribute
        WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped
          AND ($3::text[] IS NULL OR attname = ANY ($3::text[]))`,
      [table.oid, request.orderBy.column, visible],
    );
    if (rows.length === 0) {
      throw new InvalidRequestError(
        `Cannot read snapshot: column ${
          JSON.stringify(request.orderBy.column)
        } does not exist in ${table.qualified}`,
      );
    }
    const descending = request.orderBy.order === "DESC";
    return {
      clause: ` ORDER BY ${rows[0].quoted} ${request.orderBy.order}`,
      byColumns: true,
      keyset: rows[0].quoted,
      descending,
    };
  }
  // The primary key, else the replica identity's unique index, whichever is wholly visible.
  const { rows } = await client.query<{ key: string | null; columns: number }>(
    `SELECT string_agg(format('%I', a.attname), ', ' ORDER BY array_position(i.indkey, a.attnum)) AS key,
            count(*)::int AS columns
       FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
      WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident)
      GROUP BY i.indexrelid, i.indisprimary
     HAVING $2::text[] IS NULL OR bool_and(a.attname = ANY ($2::text[]))
      ORDER BY i.indisprimary DESC LIMIT 1`,
    [table.oid, visible],
  );
  const key = rows[0]?.key;
  if (key) {
    return {
      clause: ` ORDER BY ${key}`,
      byColumns: true,
      keyset: rows[0].columns === 1 ? key : undefined,
      descending: false,
    };
  }
  // Without a key, physical order still makes OFFSET pages disjoint within one snapshot.
  if (table.relkind === "r" || table.relkind === "m") {
    return { clause: " ORDER BY ctid", byColumns: false, descending: false };
  }
  if (table.relkind === "p") {
    return { clause: " ORDER BY tableoid, ctid", byColumns: false, descending: false };
  }
  return { clause: "", byColumns: false, descending: false };
}

/**
 * A select-list expression that makes PostgreSQL itself write each row as a
 * JSON object with wal2json's value rules (numbers verbatim, NaN/Infinity as
 * null, booleans, bytea hex without `\x`, everything else a string of its
 * text form, from the type's output function as wal2json takes it: not a
 * `::text` cast, which trims `char(n)` and adds `/32` to `inet`). Built by PostgreSQL from the catalog (`format` with `%I`/`%L`),
 * so no request input is involved; the client then parses one text column a
 * row instead of every value, which is what makes snapshots fast. Types are
 * matched on `atttypid`, as wal2json does (a domain over int4 is a string).
 */
export async function jsonSelectList(
  client: pg.PoolClient,
  table: ResolvedTable,
  only: string[] | null = null,
): Promise<string> {
  const { rows } = await client.query<{ expr: string | null }>(
    `SELECT string_agg(format('%L || %s', CASE WHEN a.n = 1 THEN '{' ELSE ',' END || to_json(a.attname::text)::text || ':',
              CASE
                WHEN a.atttypid IN (20, 21, 23, 26) THEN format($f$coalesce(%1$I::text, 'null')$f$, a.attname)
                WHEN a.atttypid IN (700, 701, 1700) THEN format(
                  $f$CASE WHEN %1$I IS NULL OR %1$I::text IN ('NaN', 'Infinity', '-Infinity') THEN 'null' ELSE %1$I::text END$f$,
                  a.attname)
                WHEN a.atttypid = 16 THEN format($f$CASE WHEN %1$I THEN 'true' WHEN NOT %1$I THEN 'false' ELSE 'null' END$f$, a.attname)
                WHEN a.atttypid = 17 THEN format($f$coalesce(to_json(substr(%1$I::text, 3))::text, 'null')$f$, a.attname)
                -- char(n) and inet: their ::text casts trim or reformat, so call the output function.
                WHEN a.atttypid IN (1042, 869) THEN format($f$CASE WHEN %1$I IS NULL THEN 'null' ELSE to_json(format('%%s', %1$I))::text END$f$, a.attname)
                ELSE format($f$coalesce(to_json(%1$I::text)::text, 'null')$f$, a.attname)
              END), ' || ' ORDER BY a.n) || $f$ || '}'$f$ AS expr
       FROM (SELECT attname, atttypid, row_number() OVER (ORDER BY attnum) AS n
               FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
                 AND ($2::text[] IS NULL OR attname = ANY ($2::text[]))) a`,
    [table.oid, only],
  );
  return rows[0]?.expr ?? "'{}'";
}

/** A condition of a view, with its column's type (`format_type()`) to cast its values to. */
export interface ViewCondition extends Condition {
  typeName: string;
}

/** The part of a table a view lets a reader see: its columns (null: every one) and rows. */
export interface ViewedTable {
  columns: string[] | null;
  where: ViewCondition[];
}

/**
 * What a stream lets its readers see: only its tables (others read as
 * missing), and of each only its columns and the rows its filter passes.
 */
export interface SnapshotView {
  /** The stream's part of the table `oid`, or undefined when it is not one of the stream's. */
  table(oid: number): ViewedTable | undefined;
}

/** Resolves and locks `name` for this read, and checks it is still as the snapshot saw it. */
async function openTable(
  client: pg.PoolClient,
  source: SnapshotSource,
  name: string,
): Promise<ResolvedTable> {
  const table = await resolveTable(
    client,
    name,
    source.ownSchema,
    "Cannot read snapshot",
    " (as of the snapshot)",
  );
  await lockUnchanged(client, source, table);
  return table;
}

/** A read's table: what it is, its part visible to the reader, the select list and the row filter. */
export interface TableRead {
  table: ResolvedTable;
  /** The columns the reader may see (and so sort and seek by); null: every one. */
  visible: string[] | null;
  /** The JSON-building select list of the visible columns. */
  select: string;
  /** The filter as SQL (`true` when none). */
  where: string;
}

/** How a read binds the filter's values: as parameters numbered from `from`, or as literals. */
export type Binding = { params: unknown[]; from: number } | "literals";

/**
 * Opens `name` for a read through `source`'s view: resolved, locked,
 * checked unchanged, and restricted to what the view lets the reader see.
 * The filter's values are bound as `binding` says: parameters (pushed onto
 * its `params`), or literals that PostgreSQL quoted (for COPY, which takes
 * no parameters).
 */
export async function openViewedTable(
  client: pg.PoolClient,
  source: SnapshotSource,
  name: string,
  binding: Binding,
): Promise<TableRead> {
  const table = await openTable(client, source, name);
  const part = source.view === undefined
    ? { columns: null, where: [] }
    : source.view.table(table.oid);
  if (part === undefined) {
    throw new NotFoundError(
      `Cannot read snapshot: table ${JSON.stringify(name)} does not exist (as of the snapshot)`,
    );
  }
  const select = await jsonSelectList(client, table, part.columns);
  if (part.where.length === 0) return { table, visible: part.columns, select, where: "true" };
  // The filter's columns quoted by PostgreSQL from the catalog as of the snapshot, and, for
  // literals, its values quoted by PostgreSQL too.
  const values = part.where.flatMap((c) => c.values);
  const { rows: [{ quoted, literals }] } = await client.query<
    { quoted: Record<string, string>; literals: string[] }
  >(
    `SELECT (SELECT json_object_agg(attname, format('%I', attname)) FROM pg_attribute
              WHERE attrelid = $1 AND attname = ANY ($2::text[]) AND attnum > 0 AND NOT attisdropped)
              AS quoted,
            array(SELECT format('%L', v) FROM unnest($3::text[]) WITH ORDINALITY AS t(v, n) ORDER BY n)
              AS literals`,
    [table.oid, part.where.map((c) => c.column), values],
  );
  const types = new Map(part.where.map((c) => [c.column, c.typeName]));
  let next = 0;
  const bind = binding === "literals" ? () => literals[next++] : (value: string) => {
    binding.params.push(value);
    return `$${binding.from + binding.params.length - 1}`;
  };
  const where = conditionsSql(
    part.where,
    (column) => quoted[column] ?? "NULL",
    (column) => types.get(column)!,
    bind,
  );
  return { table, visible: part.columns, select, where };
}

/** Reads one page of `request.table` as of the snapshot, as a JSON array of row objects (text). */
export async function readPage(source: SnapshotSource, request: PageRequest): Promise<string> {
  try {
    return await source.snapshot.read(async (client) => {
      const params: unknown[] = [];
      const { table, visible, select, where } = await openViewedTable(
        client,
        source,
        request.table,
        { params, from: 3 },
      );
      const order = await sortOrder(client, table, request, visible);
      const filter = where === "true" ? "" : ` WHERE ${where}`;
      const and = where === "true" ? "" : ` AND ${where}`;
      let text: string;
      const values: unknown[] = [request.limit];
      if (request.after !== undefined) {
        if (order.keyset === undefined) {
          throw new InvalidRequestError(
            'Invalid request: "after" needs one sort column: give order_by, or use a table with a one-column primary key',
          );
        }
        // Keyset paging: an index seek, as fast at the end of the table as at its start.
        text = `SELECT ${select} FROM ${table.qualified} WHERE ${order.keyset} ${
          order.descending ? "<" : ">"
        } $2${and}${order.clause} LIMIT $1`;
        values.push(request.after);
      } else if (order.byColumns) {
        // Build JSON for the returned rows only, not for the ones OFFSET skips; re-sort outside.
        text =
          `SELECT ${select} FROM (SELECT * FROM ${table.qualified}${filter}${order.clause} LIMIT $1 OFFSET $2) AS page${order.clause}`;
        values.push(request.offset);
      } else {
        text =
          `SELECT ${select} FROM ${table.qualified}${filter}${order.clause} LIMIT $1 OFFSET $2`;
        values.push(request.offset);
      }
      const result = await client.query({
        text,
        values: [...values, ...params],
        rowMode: "array",
        types: RAW_TEXT_TYPES,
      });
      source.countRows?.(result.rows.length);
      return `[${(result.rows as string[][]).map((row) => row[0]).join(",")}]`;
    });
  } catch (error) {
    throw mapReadError(error);
  }
}

/** PostgreSQL errors a snapshot read can cause by its input, as the request's errors; others unchanged. */
export function mapReadError(error: unknown): unknown {
  switch (sqlState(error)) {
    case SqlState.InsufficientPrivilege:
      return new ForbiddenError(`Cannot read snapshot: ${(error as Error).message}`);
    case SqlState.UndefinedFunction:
      return new InvalidRequestError(`Cannot read snapshot: ${(error as Error).message}`);
  }
  return error;
}
