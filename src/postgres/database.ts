/**
 * Connections to PostgreSQL through `npm:pg`, and the few error facts the
 * rest of the server needs from it.
 * @module
 */

import pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { log } from "../observability/log.ts";
import { lookupPassword } from "./pgpass.ts";
import { PgTransport } from "./pg_transport.ts";

/**
 * Settings that change the text PostgreSQL writes for a value (bytea,
 * dates, intervals, floats), pinned on every connection the server opens,
 * the replication connection included: a row then reads the same in a frame
 * and in a snapshot, and frames stay valid wal2json, whatever an operator set
 * per database or role. These are PostgreSQL's own defaults.
 */
export const VALUE_SETTINGS: Readonly<Record<string, string>> = {
  bytea_output: "hex",
  DateStyle: "ISO,MDY",
  IntervalStyle: "postgres",
  extra_float_digits: "1",
};

/** `db` with {@link VALUE_SETTINGS} added to its startup `options` (after the operator's own `PGOPTIONS`). */
export function withValueSettings(db: DatabaseConfig): DatabaseConfig {
  const pinned = Object.entries(VALUE_SETTINGS).map(([name, value]) => `-c ${name}=${value}`);
  return { ...db, options: [db.options, ...pinned].filter(Boolean).join(" ") };
}

/** Options of {@link clientConfig}. */
export interface ClientOptions {
  /** A walsender connection, for replication commands and START_REPLICATION. */
  replication?: boolean;
  /** Told of each connection's transport as it is made. */
  created?: (transport: PgTransport) => void;
}

/**
 * npm:pg's settings for a connection as `db` says: every connection of the
 * server goes through a {@link PgTransport} (TLS by `sslmode`, certificates,
 * keepalives, authentication that never gives the password away), with the
 * pinned value settings, the password from the password file when none was
 * given, and `connect_timeout`.
 */
export function clientConfig(db: DatabaseConfig, options: ClientOptions = {}): pg.ClientConfig {
  const settled = withValueSettings(db);
  return {
    host: db.host,
    port: db.port,
    user: db.user,
    database: db.database,
    options: settled.options,
    application_name: db.application_name,
    password: () => password(db),
    ssl: false, // TLS is the transport's, by libpq's rules
    stream: () => {
      const transport = new PgTransport(db);
      options.created?.(transport);
      return transport;
    },
    connectionTimeoutMillis: (db.connectTimeoutSeconds ?? 0) * 1000,
    keepAlive: db.keepalives ?? true,
    keepAliveInitialDelayMillis: (db.keepalivesIdleSeconds ?? 60) * 1000,
    ...(options.replication ? { replication: "database" } : {}),
  } as pg.ClientConfig;
}

/** The password for `db`: the one given, else the password file's; an error saying where to put one. */
async function password(db: DatabaseConfig): Promise<string> {
  if (db.password !== undefined) return db.password;
  const found = db.passfile === undefined ? undefined : await lookupPassword(
    db.passfile,
    { host: db.host, port: db.port, database: db.database, user: db.user },
    (message) => log.warn("connection.passfile", message),
  );
  if (found !== undefined) return found;
  throw new Error(
    `PostgreSQL asks for a password for user "${db.user}": set PGPASSWORD, or add a line for it ` +
      `to the password file ${db.passfile ?? "(PGPASSFILE, or ~/.pgpass)"}`,
  );
}

/** A pool for short metadata queries (catalog look-ups, slot bookkeeping). */
export function createPool(db: DatabaseConfig, max = 4, waitMs = 0): pg.Pool {
  const config = clientConfig(db);
  const pool = new pg.Pool({
    ...config,
    max,
    idleTimeoutMillis: 10_000,
    // How long a checkout may wait for a connection (0: as long as it takes); a new connection
    // is given connect_timeout besides.
    connectionTimeoutMillis: waitMs || config.connectionTimeoutMillis,
  });
  // An idle client's connection dying must not crash the process; the next query reconnects.
  pool.on("error", () => {});
  // Nor a checked-out one's (the pool listens only while a client is idle): pg emits "error" on
  // a client whose connection ends between its queries (a failover, a restart, a terminated
  // backend), and an unheard "error" is an uncaught exception. The next query on it fails.
  pool.on("connect", (client: pg.PoolClient) => client.on("error", () => {}));
  return pool;
}

/** A dedicated connection; `replication` opens a walsender connection for replication commands. */
export async function connect(db: DatabaseConfig, replication = false): Promise<pg.Client> {
  const client = new pg.Client(clientConfig(db, { replication }));
  client.on("error", () => {});
  await client.connect();
  return client;
}

/** SQLSTATE of a PostgreSQL error, or undefined for anything else. */
export function sqlState(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

const CONNECTION_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "ENOTFOUND",
  "EAI_AGAIN",
]);

/**
 * Whether `error` means PostgreSQL is unreachable or going away (restart,
 * crash, failover) rather than that the request was wrong: worth a retry.
 */
export function isConnectionError(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === "string") {
    // 08: connection exceptions; 57P01-3: shutdown, crash, cannot connect now; 53300: too many clients.
    return CONNECTION_CODES.has(code) || code.startsWith("08") || /^57P0[1-3]$/.test(code) ||
      code === "53300";
  }
  return /Connection terminated|connection (is )?closed|Client has encountered a connection error/i
    .test(
      (error as Error)?.message ?? "",
    );
}

/** SQLSTATEs the server reacts to. */
export const SqlState = {
  /** `undefined_object`: e.g. a replication slot that does not exist. */
  UndefinedObject: "42704",
  /** `unique_violation`: e.g. a stream name already taken. */
  UniqueViolation: "23505",
  /** `duplicate_object`: e.g. a slot name already taken. */
  DuplicateObject: "42710",
  /** `object_in_use`: e.g. a slot another walsender is streaming. */
  ObjectInUse: "55006",
  /** `undefined_table`: e.g. a table dropped after a snapshot. */
  UndefinedTable: "42P01",
  /** `insufficient_privilege`. */
  InsufficientPrivilege: "42501",
  /** `undefined_function`: e.g. no ordering operator for an order_by column's type. */
  UndefinedFunction: "42883",
  /** `configuration_limit_exceeded`: e.g. all replication slots in use. */
  ConfigurationLimitExceeded: "53400",
} as const;

/** Rows as arrays of PostgreSQL's text output, untouched by `npm:pg`'s type parsers. */
export const RAW_TEXT_TYPES = { getTypeParser: () => (value: string) => value };
