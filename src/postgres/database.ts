/**
 * Connections to PostgreSQL through `npm:pg`, and the few error facts the
 * rest of the server needs from it.
 * @module
 */

import pg from "pg";
import type { DatabaseConfig } from "../config.ts";

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

/** A pool for short metadata queries (catalog look-ups, slot bookkeeping). */
export function createPool(db: DatabaseConfig, max = 4, waitMs = 0): pg.Pool {
  const pool = new pg.Pool({
    ...withValueSettings(db),
    max,
    idleTimeoutMillis: 10_000,
    // 0: wait as long as it takes; otherwise how long a checkout may wait for a connection.
    connectionTimeoutMillis: waitMs,
  });
  // An idle client's connection dying must not crash the process; the next query reconnects.
  pool.on("error", () => {});
  return pool;
}

/** A dedicated connection; `replication` opens a walsender connection for replication commands. */
export async function connect(db: DatabaseConfig, replication = false): Promise<pg.Client> {
  const settled = withValueSettings(db);
  const client = new pg.Client(
    replication ? { ...settled, replication: "database" } as pg.ClientConfig : settled,
  );
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
