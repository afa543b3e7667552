/**
 * `deno task setup-sql`: prints the SQL a superuser runs once when the
 * server's own role may not create publications FOR ALL TABLES.
 * @module
 */

import { schemaNames, setupSql } from "./server_schema.ts";

if (import.meta.main) {
  const prefix = Deno.args[0] ?? "pgdeltastream";
  console.log(setupSql(schemaNames(prefix)).trim());
}
