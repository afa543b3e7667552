/**
 * Start-up checks: each problem PostgreSQL can have that would make the
 * server useless, found before it listens, with what to do about it.
 * @module
 */

import { type DatabaseConfig, describeDatabase } from "../config.ts";
import { connect, sqlState } from "./database.ts";

/**
 * Connection poolers in transaction mode (PgBouncer, Supavisor, Neon's
 * "-pooler" endpoints, Supabase's port 6543) cannot carry replication or an
 * exported snapshot: a client's statements go to whichever backend is free.
 */
const POOLER_REFUSAL = /unsupported startup parameter|replication.*not supported|pooler/i;

/** What to tell an operator whose URL looks like a transaction pooler's. */
export function poolerHint(db: DatabaseConfig): string | undefined {
  if (!/-pooler\./.test(db.host) && db.port !== 6543) return undefined;
  return `${
    describeDatabase(db)
  } looks like a connection pooler (a "-pooler" host, or port 6543): ` +
    "replication and exported snapshots need a direct connection to PostgreSQL; use your " +
    "provider's direct (session) URL, e.g. Supabase's port 5432 or Neon's host without -pooler";
}

function connectionProblem(db: DatabaseConfig, error: unknown, replication: boolean): string {
  const where = describeDatabase(db);
  const message = (error as Error).message;
  const code = sqlState(error) ?? (error as { code?: string }).code;
  if (replication && POOLER_REFUSAL.test(message)) {
    return `PostgreSQL at ${where} refused a replication connection (${message}): this looks ` +
      "like a connection pooler. Replication and exported snapshots need a direct connection: " +
      "use your provider's direct (session) URL, not its pooled one.";
  }
  switch (code) {
    case "ECONNREFUSED":
    case "ENOTFOUND":
    case "EAI_AGAIN":
    case "ETIMEDOUT":
      return `Cannot connect to PostgreSQL at ${where}: ${message}. Is it running? ` +
        "Set PGHOST and PGPORT (or DATABASE_URL) to where it listens.";
    case "28P01":
    case "28000":
      return replication && /replication/.test(message)
        ? `PostgreSQL at ${where} refuses replication connections: ${message}. ` +
          `Add "host replication ${db.user} <client address> scram-sha-256" (or trust) to pg_hba.conf and reload.`
        : `PostgreSQL at ${where} rejected user "${db.user}": ${message}. Check PGUSER and PGPASS (or DATABASE_URL).`;
    case "3D000":
      return `Database missing at ${where}: ${message}. Set DBNAME (or PGDATABASE, DATABASE_URL) to an existing database.`;
    case "ETLS":
      return message;
    case "ENOHOST":
      return `${message}. The server needs the primary: list it among the hosts (or wait for a ` +
        "standby's promotion).";
  }
  return `Cannot connect to PostgreSQL at ${where}${
    replication ? " for replication" : ""
  }: ${message}`;
}

/** What the start-up checks found: problems that stop the server, and warnings it starts with. */
export interface PreflightReport {
  problems: string[];
  warnings: string[];
}

/** Runs every check; `problems` is empty when the database is ready. */
export async function preflight(db: DatabaseConfig): Promise<PreflightReport> {
  let client;
  try {
    client = await connect(db);
  } catch (error) {
    return { problems: [connectionProblem(db, error, false)], warnings: [] };
  }
  const problems: string[] = [];
  const warnings: string[] = [];
  const pooler = poolerHint(db);
  if (pooler !== undefined) warnings.push(pooler);
  if (db.sslmode === "require" && db.sslrootcert === undefined) {
    warnings.push(
      "sslmode=require encrypts the connection but does not check the server's certificate: " +
        "anyone in the middle can pose as PostgreSQL. Give your provider's CA file as " +
        "sslrootcert and use sslmode=verify-full",
    );
  }
  try {
    const { rows } = await client.query<{
      wal_level: string;
      can_replicate: boolean;
      free_slots: number;
      version: number;
      standby: boolean;
    }>(
      `SELECT current_setting('wal_level') AS wal_level,
              (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user) AS can_replicate,
              current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int
                AS free_slots,
              current_setting('server_version_num')::int AS version,
              pg_is_in_recovery() AS standby`,
    );
    const facts = rows[0];
    if (facts.standby) {
      problems.push(
        `PostgreSQL at ${describeDatabase(db)} is a standby (in recovery), but the server needs ` +
          "the primary: it makes its slots, publications and schema there. Point DATABASE_URL at " +
          "the primary, or list every host with target_session_attrs=read-write.",
      );
      return { problems, warnings };
    }
    if (facts.version < 100000) {
      problems.push(
        `PostgreSQL ${facts.version} is too old: logical replication with pgoutput needs 10 or later.`,
      );
    }
    if (facts.wal_level !== "logical") {
      problems.push(
        `wal_level is "${facts.wal_level}", but logical decoding needs "logical": set wal_level = logical ` +
          "in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL.",
      );
    }
    if (!facts.can_replicate) {
      problems.push(
        `Role "${db.user}" lacks the REPLICATION privilege: run ALTER ROLE "${db.user}" WITH REPLICATION as a superuser.`,
      );
    }
    if (facts.free_slots <= 0) {
      // Streaming existing slots needs none; only init does, and it answers 503 meanwhile.
      warnings.push(
        "No free replication slots (max_replication_slots is reached): existing slots stream, but " +
          "init answers 503 until you drop unused slots with pg_drop_replication_slot() or raise " +
          "max_replication_slots and restart PostgreSQL.",
      );
    }
  } finally {
    await client.end().catch(() => {});
  }
  if (problems.length > 0) return { problems, warnings };
  try {
    const replication = await connect(db, true);
    await replication.query("IDENTIFY_SYSTEM");
    await replication.end();
  } catch (error) {
    problems.push(connectionProblem(db, error, true));
  }
  return { problems, warnings };
}
