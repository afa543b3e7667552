/**
 * A v2 stream's definition: which tables, which of their columns and rows,
 * which kinds of change. Created from a `POST /v2/streams` request by
 * resolving every name in the catalog and checking every filter value with
 * PostgreSQL itself (cast to its column's type), then stored as it is here:
 * tables by OID (so a renamed table stays in the stream), conditions with
 * canonical values and what their comparison needs.
 * @module
 */

import type pg from "pg";
import { InvalidRequestError } from "../errors.ts";
import { sqlState } from "../postgres/database.ts";
import { resolveTable } from "../postgres/resolve_table.ts";
import type { StreamOperation, StreamTable } from "../protocol.ts";
import {
  type ColumnInfo,
  comparisonOf,
  compileTest,
  type Condition,
  type Operator,
  operatorsFor,
} from "../replication/row_filter.ts";

/** A condition as stored: with its column's type and how its values compare. */
export interface StoredCondition extends Condition, ColumnInfo {
  /** `format_type()` of the column's type, to cast bound values to in SQL. */
  typeName: string;
}

/** A table of a stream, as stored. */
export interface StoredTable {
  oid: number;
  /** Its name when the stream was created (frames carry the name of the moment). */
  schema: string;
  table: string;
  /** The columns carried; null: every column, also those added later. */
  columns: string[] | null;
  /** The replica identity when the stream was created. */
  key: string[];
  where: StoredCondition[];
}

/** A stream's definition, as stored in `pgdeltastream.streams.definition`. */
export interface StreamDefinition {
  tables: StoredTable[];
  operations: StreamOperation[];
  /** How a consumer gets its first copy: an exported snapshot (absent: the default), or backfills. */
  initial?: "backfill";
}

/** A condition of a request: `[column, op, value?]`, values as JSON gave them. */
export type RequestCondition = [string, Operator, unknown?];

/** One table of a validated request. */
export interface RequestTable {
  table: string;
  columns?: string[];
  where?: RequestCondition[];
}

/** A column as the catalog describes it now. */
interface CatalogColumn extends ColumnInfo {
  name: string;
  typeName: string;
}

/** A JSON value of a condition, as text for PostgreSQL to cast (big numbers keep their digits). */
function valueText(value: unknown): string {
  if (typeof value === "object" && value !== null && "source" in value) {
    return String((value as { source: string }).source);
  }
  return String(value);
}

async function catalogColumns(client: pg.PoolClient, oid: number): Promise<CatalogColumn[]> {
  const { rows } = await client.query<{
    name: string;
    type_oid: number;
    type_name: string;
    code_point_order: boolean;
    deterministic: boolean;
  }>(
    `SELECT a.attname AS name, a.atttypid::int AS type_oid,
            format_type(a.atttypid, a.atttypmod) AS type_name,
            coalesce(co.collname IN ('C', 'POSIX', 'ucs_basic')
              OR (co.collname = 'default' AND d.datcollate IN ('C', 'POSIX')
                  AND coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c'), false) AS code_point_order,
            coalesce((to_jsonb(co) ->> 'collisdeterministic')::boolean, true) AS deterministic
       FROM pg_attribute a
       LEFT JOIN pg_collation co ON co.oid = a.attcollation
       CROSS JOIN (SELECT * FROM pg_database WHERE datname = current_database()) d
      WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
      ORDER BY a.attnum`,
    [oid],
  );
  return rows.map((r: {
    name: string;
    type_oid: number;
    type_name: string;
    code_point_order: boolean;
    deterministic: boolean;
  }) => ({
    name: r.name,
    typeName: r.type_name,
    typeOid: r.type_oid,
    codePointOrder: r.code_point_order,
    padded: r.type_oid === 1042,
    deterministic: r.deterministic,
  }));
}

/** The replica identity's columns: the primary key, the chosen index, every column (FULL), or none. */
async function replicaIdentity(
  client: pg.PoolClient,
  oid: number,
  columns: CatalogColumn[],
): Promise<string[]> {
  const { rows } = await client.query<{ identity: string; key: string[] | null }>(
    `SELECT c.relreplident::text AS identity,
            (SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey, a.attnum))
               FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = c.oid
                AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident
                    ELSE false END) AS key
       FROM pg_class c WHERE c.oid = $1`,
    [oid],
  );
  if (rows[0].identity === "f") return columns.map((c) => c.name);
  return rows[0].key ?? [];
}

/** What a definition is resolved for: the errors' action, and each table's field in the request. */
export interface DefinitionContext {
  action: string;
  /** The request's field of table `index`, with a trailing dot (or empty: the body itself). */
  field: (index: number) => string;
}

/** Resolving a `POST /v2/streams`. */
const CREATING: DefinitionContext = {
  action: "Cannot create stream",
  field: (index) => `tables[${index}].`,
};

/**
 * The definition `tables` and `operations` ask for, resolved in the
 * catalog: a `NotFoundError` for a table that does not exist,
 * {@link InvalidRequestError} for a column that does not exist (the
 * definition is wrong, not a resource missing), a column list without the replica
 * identity, an operator the column's type does not allow here, or a value
 * the type rejects.
 */
export async function resolveDefinition(
  pool: pg.Pool,
  ownSchema: string,
  tables: RequestTable[],
  operations: StreamOperation[],
  context: DefinitionContext = CREATING,
): Promise<StreamDefinition> {
  const client = await pool.connect();
  try {
    await client.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    const resolved: StoredTable[] = [];
    for (const [index, request] of tables.entries()) {
      const at = context.field(index);
      const found = await resolveTable(client, request.table, ownSchema, context.action);
      if (resolved.some((t) => t.oid === found.oid)) {
        throw new InvalidRequestError(
          `Invalid request: "${at.slice(0, -1)}": table ${found.qualified} is listed twice`,
        );
      }
      const { rows: [name] } = await client.query<{ schema: string; table: string }>(
        `SELECT n.nspname AS schema, c.relname AS table
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`,
        [found.oid],
      );
      const columns = await catalogColumns(client, found.oid);
      const byName = new Map(columns.map((c) => [c.name, c]));
      const column = (wanted: string, where: string) => {
        const info = byName.get(wanted);
        if (info === undefined) {
          throw new InvalidRequestError(
            `${context.action}: "${where}": column ${
              JSON.stringify(wanted)
            } does not exist in ${found.qualified}`,
          );
        }
        return info;
      };
      const key = await replicaIdentity(client, found.oid, columns);
      if (request.columns !== undefined) {
        request.columns.forEach((c, i) => column(c, `${at}columns[${i}]`));
        if (new Set(request.columns).size !== request.columns.length) {
          throw new InvalidRequestError(`Invalid request: "${at}columns" names a column twice`);
        }
        const missing = key.filter((k) => !request.columns!.includes(k));
        if (missing.length > 0) {
          throw new InvalidRequestError(
            `Invalid request: "${at}columns" must include the replica identity of ${found.qualified}, ` +
              `which keys its updates and deletes; missing: ${missing.join(", ")}`,
          );
        }
      }
      const where: StoredCondition[] = [];
      for (const [i, [name, op, value]] of (request.where ?? []).entries()) {
        const path = `${at}where[${i}]`;
        const info = column(name, path);
        if (!operatorsFor(info).includes(op)) {
          const kind = comparisonOf(info) === "string"
            ? `${info.typeName}${info.codePointOrder ? "" : " (not in the C collation)"}`
            : info.typeName;
          throw new InvalidRequestError(
            `Invalid request: "${path}": operator "${op}" is not supported on column ${
              JSON.stringify(name)
            } of type ${kind}; supported there: ${operatorsFor(info).join(", ")}`,
          );
        }
        const values = op === "is null" || op === "is not null"
          ? []
          : op === "like"
          ? await likePatterns(client, [String(value)], path)
          : await canonical(client, info, op === "in" ? value as unknown[] : [value], path);
        const condition: StoredCondition = { column: name, op, values, ...info };
        try {
          // The decoder's test of it is built here, not at the stream's first change.
          compileTest(condition, info);
        } catch (error) {
          throw new InvalidRequestError(`Invalid request: "${path}": ${(error as Error).message}`);
        }
        where.push(condition);
      }
      resolved.push({
        oid: found.oid,
        schema: name.schema,
        table: name.table,
        columns: request.columns ?? null,
        key,
        where,
      });
    }
    await client.query("COMMIT");
    return { tables: resolved, operations };
  } catch (error) {
    await client.query("ROLLBACK").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

/**
 * Runs `text` (binding `texts` as `$1::text[]`, returning a `value` a row)
 * in a savepoint: PostgreSQL's refusal of a value is the request's error
 * (a 400 naming `path`, and `about` the column), not the transaction's.
 */
async function checkedValues(
  client: pg.PoolClient,
  text: string,
  texts: string[],
  path: string,
  about: string,
): Promise<string[]> {
  await client.query("SAVEPOINT check_values");
  try {
    const { rows } = await client.query<{ value: string }>(text, [texts]);
    await client.query("RELEASE SAVEPOINT check_values");
    return rows.map((r: { value: string }) => r.value);
  } catch (error) {
    if (sqlState(error) === undefined) throw error;
    await client.query("ROLLBACK TO SAVEPOINT check_values");
    throw new InvalidRequestError(
      `Invalid request: "${path}": ${(error as Error).message}${about}`,
    );
  }
}

/** Each value cast by PostgreSQL to the column's type, as its text: the canonical form the stream compares. */
function canonical(
  client: pg.PoolClient,
  info: CatalogColumn,
  values: unknown[],
  path: string,
): Promise<string[]> {
  // The type name comes from the catalog (format_type), never from the request; values are bound.
  // format('%s') calls the type's output function, as pgoutput does (a ::text cast need not:
  // boolean's gives "true" where the output function writes "t", char(n)'s trims).
  return checkedValues(
    client,
    `SELECT format('%s', CAST(v AS ${info.typeName})) AS value
       FROM unnest($1::text[]) WITH ORDINALITY AS t(v, n) ORDER BY n`,
    values.map(valueText),
    path,
    ` (the column is ${info.typeName})`,
  );
}

/** LIKE patterns, each tried by PostgreSQL once (which refuses one that ends in its escape). */
function likePatterns(client: pg.PoolClient, patterns: string[], path: string): Promise<string[]> {
  return checkedValues(
    client,
    `SELECT p AS value FROM unnest($1::text[]) WITH ORDINALITY AS t(p, n)
      WHERE ('' LIKE p) IS NOT NULL ORDER BY n`,
    patterns,
    path,
    "",
  );
}

/** The stored table as a response shows it: schema-qualified, its columns resolved as they are now. */
export async function describeTables(
  pool: pg.Pool,
  definition: StreamDefinition,
): Promise<StreamTable[]> {
  const { rows } = await pool.query<
    { oid: number; schema: string; table: string; columns: string[] }
  >(
    `SELECT c.oid::int AS oid, n.nspname AS schema, c.relname AS table,
            array(SELECT a.attname::text FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum)
              AS columns
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = ANY ($1::oid[])`,
    [definition.tables.map((t) => t.oid)],
  );
  const now = new Map(rows.map((r: { oid: number }) => [r.oid, r]));
  return definition.tables.map((t) => {
    const current = now.get(t.oid) as
      | { schema: string; table: string; columns: string[] }
      | undefined;
    return {
      schema: current?.schema ?? t.schema,
      table: current?.table ?? t.table,
      columns: t.columns ?? current?.columns ?? [],
      allColumns: t.columns === null,
      key: t.key,
      where: t.where.map((c) =>
        c.op === "is null" || c.op === "is not null"
          ? [c.column, c.op]
          : [c.column, c.op, c.op === "in" ? c.values : c.values[0]]
      ) as StreamTable["where"],
    };
  });
}
