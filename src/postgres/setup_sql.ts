/**
 * `deno task setup-sql [prefix] [role]`: prints the SQL a superuser runs once
 * when the server's own role (`role`, granted what it needs) may not create
 * publications FOR ALL TABLES.
 * @module
 */

import { schemaNames, setupSql } from "./server_schema.ts";

if (import.meta.main) {
  const [prefix = "pgdeltastream", role] = Deno.args;
  if (!/^[a-z_][a-z0-9_]{0,40}$/.test(prefix)) {
    console.error(
      `setup-sql: the prefix must be lower-case letters, digits and _, as PUBLICATION_PREFIX`,
    );
    Deno.exit(2);
  }
  console.log(setupSql(schemaNames(prefix), role).trim());
}
