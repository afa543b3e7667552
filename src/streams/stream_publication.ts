/**
 * What a v2 stream's walsender is told to send, so that PostgreSQL drops
 * what the stream does not want before decoding it into messages:
 *
 * - inserts come from a publication of the stream's own (`<slot>_i`, FOR
 *   TABLE its tables, `publish = 'insert'`), with the stream's row filter as
 *   the publication's `WHERE` on PostgreSQL 15+ (a partitioned table's is
 *   left out: PostgreSQL applies its partitions' filters instead). An
 *   insert-only publication may filter on any column, so the application's
 *   updates and deletes are never refused. The decoder still applies the
 *   whole filter, so the result is the same where PostgreSQL cannot filter;
 * - updates and deletes from the server's shared keyed publication, and
 *   truncations from its truncates publication, only if the stream wants
 *   them.
 *
 * Creating a publication FOR TABLE needs ownership of the tables: where the
 * server's role may not, the stream reads the shared all-tables insert
 * publication instead, and filters in the decoder only.
 *
 * While PostgreSQL filters on a column, that column cannot be dropped or
 * retyped (PostgreSQL names the publication in its error): delete the
 * stream first. A `DROP … CASCADE` takes the table out of the publication;
 * the stream checks its publication when it starts and every
 * {@link CHECK_INTERVAL_MS}, and stops with 4422 when a table went missing,
 * rather than go on without its inserts.
 * @module
 */

import { errorMessage, log } from "../observability/log.ts";
import type pg from "pg";
import { SqlState, sqlState } from "../postgres/database.ts";
import type { SchemaNames } from "../postgres/server_schema.ts";
import { conditionsSql } from "../replication/row_filter.ts";
import type { StreamDefinition } from "./stream_definition.ts";

/** How often an open stream checks that its insert publication still holds its tables. */
export const CHECK_INTERVAL_MS = 10_000;

/** The insert publication of the stream whose slot is `slotName`. */
export function insertPublicationName(slotName: string): string {
  return `${slotName}_i`;
}

/**
 * Creates the stream's insert publication; its name, or undefined (with the
 * reason logged) when the server's role may not, so that the stream reads
 * the shared one. Every name and value in its text is quoted by PostgreSQL.
 */
export async function createInsertPublication(
  pool: pg.Pool,
  slotName: string,
  definition: StreamDefinition,
): Promise<string | undefined> {
  if (!definition.operations.includes("insert")) return undefined;
  const name = insertPublicationName(slotName);
  const entries = await publicationEntries(pool, definition);
  if (entries.length === 0) return undefined;
  try {
    await pool.query(`DROP PUBLICATION IF EXISTS ${name}`);
    await pool.query(
      `CREATE PUBLICATION ${name} FOR TABLE ${entries.join(", ")} WITH (publish = 'insert')`,
    );
    return name;
  } catch (error) {
    if (sqlState(error) !== SqlState.InsufficientPrivilege) throw error;
    log.warn(
      "stream.filter_in_server",
      `stream of slot ${slotName} filters in the server only: the server's role may ` +
        `not create a publication of its tables (${errorMessage(error)})`,
      { slot: slotName },
    );
    return undefined;
  }
}

/**
 * Sets the tables of the insert publication `name` to those of
 * `definition`: with their row filters, or (`filtered` false) every row of
 * each, which is what a change of the definition publishes until it takes
 * effect (the decoder filters meanwhile). Names and values quoted by
 * PostgreSQL.
 */
export async function setInsertPublication(
  pool: pg.Pool,
  name: string,
  definition: StreamDefinition,
  filtered = true,
): Promise<void> {
  const entries = await publicationEntries(pool, definition, filtered);
  if (entries.length > 0) {
    await pool.query(`ALTER PUBLICATION ${name} SET TABLE ${entries.join(", ")}`);
  }
}

/** `schema.table WHERE (…)` of each of `definition`'s tables that still exists, quoted. */
async function publicationEntries(
  pool: pg.Pool,
  definition: StreamDefinition,
  filtered = true,
): Promise<string[]> {
  const { rows: [{ version }] } = await pool.query<{ version: number }>(
    "SELECT current_setting('server_version_num')::int AS version",
  );
  const entries: string[] = [];
  for (const table of definition.tables) {
    const columns = table.where.map((c) => c.column);
    const values = table.where.flatMap((c) => c.values);
    const { rows: [quoted] } = await pool.query<
      {
        qualified: string | null;
        partitioned: boolean;
        columns: Record<string, string> | null;
        literals: string[];
      }
    >(
      `SELECT format('%I.%I', n.nspname, c.relname) AS qualified, c.relkind = 'p' AS partitioned,
              (SELECT json_object_agg(x, format('%I', x)) FROM unnest($2::text[]) x) AS columns,
              array(SELECT format('%L', v) FROM unnest($3::text[]) WITH ORDINALITY AS t(v, o) ORDER BY o)
                AS literals
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`,
      [table.oid, columns, values],
    );
    if (quoted === undefined || quoted.qualified === null) continue; // dropped since
    let where = "";
    if (filtered && version >= 150000 && !quoted.partitioned && table.where.length > 0) {
      let next = 0;
      const types = new Map(table.where.map((c) => [c.column, c.typeName]));
      where = ` WHERE (${
        conditionsSql(
          table.where,
          (column) => quoted.columns![column],
          (column) => types.get(column)!,
          () => quoted.literals[next++],
        )
      })`;
    }
    entries.push(`${quoted.qualified}${where}`);
  }
  return entries;
}

/** Drops the stream's insert publication, if it has one. */
export async function dropInsertPublication(pool: pg.Pool, slotName: string): Promise<void> {
  await pool.query(`DROP PUBLICATION IF EXISTS ${insertPublicationName(slotName)}`);
}

/**
 * The stream's tables (those that still exist) missing from its insert
 * publication `name`: empty while it is whole.
 */
export async function missingTables(
  pool: pg.Pool,
  name: string,
  definition: StreamDefinition,
): Promise<string[]> {
  const { rows } = await pool.query<{ missing: string }>(
    `SELECT format('%I.%I', n.nspname, c.relname) AS missing
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.oid = ANY ($1::oid[])
        AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                         WHERE p.pubname = $2 AND pr.prrelid = c.oid)`,
    [definition.tables.map((t) => t.oid), name],
  );
  return rows.map((r: { missing: string }) => r.missing);
}

/** The publications a stream's walsender reads: only those of the kinds of change it wants. */
export function streamPublications(
  names: SchemaNames,
  definition: StreamDefinition,
  insertPublication: string | undefined,
): string[] {
  const wants = new Set(definition.operations);
  return [
    ...(wants.has("insert") ? [insertPublication ?? names.inserts] : []),
    ...(wants.has("update") || wants.has("delete") ? [names.keyed] : []),
    ...(wants.has("truncate") ? [names.truncates] : []),
  ];
}
