/**
 * Finding the table a request names, in the catalog, as PostgreSQL would
 * (quoting, case folding, `schema.table`, the search_path), among the tables
 * whose changes the server streams; anything else reads as missing.
 * @module
 */

import type pg from "pg";
import { NotFoundError } from "../errors.ts";
import { sqlState } from "./database.ts";

/** A table a request names, found in the catalog. */
export interface ResolvedTable {
  oid: number;
  /** `"schema"."table"`, quoted by PostgreSQL's format('%I.%I'), as of the snapshot. */
  qualified: string;
  relkind: string;
}

/**
 * Finds the table `name` names, in the catalog as the transaction of
 * `client` sees it (under a snapshot, a table dropped since is still found,
 * and then reported as dropped): first as PostgreSQL parses a name (`schema.table`, quoting, case
 * folding, the search_path), then as one exact name on the search_path
 * (`Mixed Case` without quotes). Only what the server streams can be read:
 * ordinary and partitioned, logged tables outside the system schemas and the
 * server's own. Anything else is answered exactly as a missing table is, so
 * the answer does not reveal that it exists.
 */
export async function resolveTable(
  client: pg.PoolClient,
  name: string,
  ownSchema: string,
  action: string,
  asOf = "",
): Promise<ResolvedTable> {
  // parse_ident rejects what is not a name (spaces, bad quoting): that leaves the exact-name rule,
  // and a savepoint keeps its error from aborting the read's transaction.
  await client.query("SAVEPOINT resolve");
  const parsed = await client.query<{ parts: string[] }>(
    "SELECT parse_ident($1) AS parts",
    [name],
  ).then(
    (result: pg.QueryResult<{ parts: string[] }>) => result.rows[0].parts,
    async (error: unknown) => {
      if (sqlState(error) === undefined) throw error;
      await client.query("ROLLBACK TO SAVEPOINT resolve");
      return null;
    },
  );
  await client.query("RELEASE SAVEPOINT resolve");
  const { rows } = await client.query<ResolvedTable>(
    `SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS qualified, c.relkind::text AS relkind
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
       LEFT JOIN unnest(current_schemas(false)) WITH ORDINALITY AS path(nspname, position)
         ON path.nspname = n.nspname
      WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
        AND n.nspname NOT IN ('information_schema', $3) AND n.nspname NOT LIKE 'pg\\_%'
        AND (CASE cardinality($1::text[])
               WHEN 1 THEN c.relname = $1[1] AND path.position IS NOT NULL
               WHEN 2 THEN n.nspname = $1[1] AND c.relname = $1[2]
               WHEN 3 THEN $1[1] = current_database() AND n.nspname = $1[2] AND c.relname = $1[3]
               ELSE false END
             OR (c.relname = $2 AND path.position IS NOT NULL))
      ORDER BY CASE cardinality($1::text[])
                 WHEN 1 THEN c.relname = $1[1]
                 WHEN 2 THEN n.nspname = $1[1] AND c.relname = $1[2]
                 WHEN 3 THEN n.nspname = $1[2] AND c.relname = $1[3]
                 ELSE false END DESC NULLS LAST,
               path.position
      LIMIT 1`,
    [parsed, name, ownSchema],
  );
  if (rows.length === 0) {
    throw new NotFoundError(`${action}: table ${JSON.stringify(name)} does not exist${asOf}`);
  }
  return rows[0];
}
