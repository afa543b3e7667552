/**
 * What the server keeps in the database: a schema with the slots it created
 * (so init drops only its own), and the two publications pgoutput reads.
 *
 * Why two publications: a table in a publication that publishes UPDATE or
 * DELETE must have a replica identity, or PostgreSQL rejects those statements
 * on it. One publication for every table's inserts, and one for updates and
 * deletes of the tables that have an identity, stream what wal2json streams
 * and never break an application's writes. An event trigger keeps the second
 * publication in step with DDL inside the DDL's own transaction.
 * @module
 */

import type pg from "pg";

/** Names of the server's database objects, all derived from one prefix. */
export interface SchemaNames {
  /** Schema holding the bookkeeping tables and functions; its changes are never streamed. */
  schema: string;
  /** Publication of every table's inserts. */
  inserts: string;
  /** Publication of updates and deletes of tables with a replica identity. */
  keyed: string;
  /** Publication of every table's truncations (read by v2 streams only). */
  truncates: string;
}

/** The object names for `prefix` (validated by the config as `[a-z_][a-z0-9_]*`). */
export function schemaNames(prefix: string): SchemaNames {
  return {
    schema: prefix,
    inserts: `${prefix}_inserts`,
    keyed: `${prefix}_keyed`,
    truncates: `${prefix}_truncates`,
  };
}

/**
 * SQL that sets everything up; the README shows it for roles that are not
 * superuser, who run `deno task setup-sql <prefix> <role>` to have it grant
 * `role` (the server's own) what it needs.
 */
export function setupSql(n: SchemaNames, role?: string): string {
  const grants = role === undefined ? "" : `
GRANT USAGE ON SCHEMA ${n.schema} TO ${quoteIdent(role)};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA ${n.schema} TO ${quoteIdent(role)};`;
  return `
CREATE SCHEMA IF NOT EXISTS ${n.schema};
CREATE TABLE IF NOT EXISTS ${n.schema}.slots (
  slot_name name PRIMARY KEY,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ${n.schema}.streams (
  name text PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,48}$'),
  slot_name name NOT NULL UNIQUE,
  definition jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
-- The WAL guard's state: limits, the idle clock, and why a stream or v1 slot was invalidated.
ALTER TABLE ${n.schema}.streams ADD COLUMN IF NOT EXISTS limits jsonb,
  ADD COLUMN IF NOT EXISTS last_activity timestamptz NOT NULL DEFAULT now(),
  ADD COLUMN IF NOT EXISTS invalidated_at timestamptz,
  ADD COLUMN IF NOT EXISTS invalidation_reason text,
  ADD COLUMN IF NOT EXISTS relay_start_seq bigint NOT NULL DEFAULT 1;
ALTER TABLE ${n.schema}.slots ADD COLUMN IF NOT EXISTS last_activity timestamptz NOT NULL DEFAULT now(),
  ADD COLUMN IF NOT EXISTS invalidated_at timestamptz,
  ADD COLUMN IF NOT EXISTS invalidation_reason text;
-- Whether the record's slot was made: a record whose slot was made and is gone (a failover to a
-- server that did not keep it) is invalidated, never recreated silently. Records from before this
-- column whose slot exists count as made.
ALTER TABLE ${n.schema}.streams ADD COLUMN IF NOT EXISTS slot_ready boolean NOT NULL DEFAULT false;
ALTER TABLE ${n.schema}.slots ADD COLUMN IF NOT EXISTS slot_ready boolean NOT NULL DEFAULT false;
UPDATE ${n.schema}.streams t SET slot_ready = true
 WHERE NOT slot_ready AND EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = t.slot_name);
UPDATE ${n.schema}.slots t SET slot_ready = true
 WHERE NOT slot_ready AND EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = t.slot_name);
-- Backfills: a stream's tables (re)read in chunks between watermarks, in its change stream.
CREATE TABLE IF NOT EXISTS ${n.schema}.backfills (
  id text PRIMARY KEY,
  stream text NOT NULL REFERENCES ${n.schema}.streams(name) ON DELETE CASCADE,
  table_oid oid NOT NULL,
  schema_name text NOT NULL,
  table_name text NOT NULL,
  mode text NOT NULL CHECK (mode IN ('replace', 'upsert')),
  conditions jsonb NOT NULL DEFAULT '[]',
  state text NOT NULL DEFAULT 'queued'
    CHECK (state IN ('queued', 'running', 'done', 'cancelling', 'cancelled')),
  started_acked boolean NOT NULL DEFAULT false,
  cursor jsonb,
  rows_done bigint NOT NULL DEFAULT 0,
  rows_estimated bigint,
  shape text,
  created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  started_at timestamptz,
  finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS backfills_stream ON ${n.schema}.backfills (stream, created_at);
-- Backfills run in the order they were queued, also those one transaction queues (a PATCH's, an
-- initial copy's): now() would give them one time, and their order would be their random ids'.
ALTER TABLE ${n.schema}.backfills ALTER COLUMN created_at SET DEFAULT clock_timestamp();
-- Why the server cancelled a backfill (its table was dropped, say); null when a client did.
ALTER TABLE ${n.schema}.backfills ADD COLUMN IF NOT EXISTS reason text;
-- The last change of a stream's definition (PATCH), until its consumer is past it in the log.
ALTER TABLE ${n.schema}.streams ADD COLUMN IF NOT EXISTS switch jsonb;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '${n.inserts}') THEN
    CREATE PUBLICATION ${n.inserts} FOR ALL TABLES WITH (publish = 'insert');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '${n.keyed}') THEN
    CREATE PUBLICATION ${n.keyed} WITH (publish = 'update, delete');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '${n.truncates}') THEN
    CREATE PUBLICATION ${n.truncates} FOR ALL TABLES WITH (publish = 'truncate');
  END IF;
END $$;
CREATE OR REPLACE FUNCTION ${n.schema}.sync_keyed_publication() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE r record;
BEGIN
  FOR r IN
    SELECT c.oid::regclass AS rel,
           EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = '${n.keyed}' AND pr.prrelid = c.oid) AS member,
           (c.relreplident = 'f'
            OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
            OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
             AS keyed
    FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
    WHERE c.relkind = 'r' AND c.relpersistence = 'p'
      AND ns.nspname NOT IN ('pg_catalog', 'information_schema', '${n.schema}')
      AND ns.nspname NOT LIKE 'pg\\_%'
  LOOP
    IF r.keyed AND NOT r.member THEN
      EXECUTE format('ALTER PUBLICATION ${n.keyed} ADD TABLE %s', r.rel);
    ELSIF r.member AND NOT r.keyed THEN
      EXECUTE format('ALTER PUBLICATION ${n.keyed} DROP TABLE %s', r.rel);
    END IF;
  END LOOP;
END $$;
CREATE OR REPLACE FUNCTION ${n.schema}.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
  PERFORM ${n.schema}.sync_keyed_publication();
EXCEPTION WHEN OTHERS THEN
  -- Never fail the application's DDL; the server re-syncs at init and stream start.
  RAISE WARNING 'pgdeltastream: could not sync publication ${n.keyed}: %', SQLERRM;
END $$;
DROP EVENT TRIGGER IF EXISTS ${n.schema}_sync;
CREATE EVENT TRIGGER ${n.schema}_sync ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'DROP INDEX', 'ALTER INDEX')
  EXECUTE FUNCTION ${n.schema}.on_ddl();
SELECT ${n.schema}.sync_keyed_publication();${grants}
`;
}

/** A role name as a quoted identifier (setup SQL is printed for a person to run, from an argument). */
function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/**
 * Creates the schema, publications and event trigger if this role may (a
 * superuser); otherwise checks that a DBA ran {@link setupSql}. Throws an
 * `Error` that says what to run.
 */
export async function ensureSchema(pool: pg.Pool, n: SchemaNames): Promise<void> {
  const { rows } = await pool.query<{ superuser: boolean; ready: boolean }>(
    `SELECT rolsuper AS superuser,
            (SELECT count(*) = 3 FROM pg_publication WHERE pubname IN ($1, $2, $3))
              AND to_regclass($4) IS NOT NULL AND to_regclass($5) IS NOT NULL
              AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($5)
                             AND attname = 'switch') AS ready
       FROM pg_roles WHERE rolname = current_user`,
    [n.inserts, n.keyed, n.truncates, `${n.schema}.slots`, `${n.schema}.streams`],
  );
  const { superuser, ready } = rows[0];
  if (!superuser) {
    if (ready) return;
    throw new Error(
      `Cannot start: the schema ${n.schema} or the publications ${n.inserts}, ${n.keyed} and ` +
        `${n.truncates} are missing or out of date, and creating publications FOR ALL TABLES needs ` +
        `a superuser. Have a superuser run the SQL printed by "deno task setup-sql ${n.schema} <role>" ` +
        `(see the README), then start again.`,
    );
  }
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    // Several servers starting at once must not race on CREATE ... IF NOT EXISTS.
    await client.query("SELECT pg_advisory_xact_lock(hashtext($1))", [n.schema]);
    await client.query(setupSql(n));
    await client.query("COMMIT");
  } catch (error) {
    await client.query("ROLLBACK").catch(() => {});
    throw error;
  } finally {
    client.release();
  }
}

/** Re-syncs the keyed publication (covers DDL made while the event trigger could not run). */
export async function syncPublication(pool: pg.Pool, n: SchemaNames): Promise<void> {
  await pool.query(`SELECT ${n.schema}.sync_keyed_publication()`);
}
