/**
 * Test support: a primary PostgreSQL and a hot standby of it, made as the
 * embedded binaries allow (initdb, pg_ctl, postgres): the primary is
 * stopped cleanly, its data directory copied, the copy given
 * `standby.signal` and its primary's connection, and both started. With
 * `syncSlots`, the standby keeps the primary's failover slots
 * (`sync_replication_slots`, PostgreSQL 17+) and the primary holds logical
 * changes back until the standby has them (`synchronized_standby_slots`).
 * @module
 */

import type { DatabaseConfig } from "../../src/config.ts";
import { EmbeddedPostgres, serverUser } from "../../src/dev/embedded_postgres.ts";
import { sql, startPostgres, waitForSql } from "./harness.ts";

/** A primary and its standby; dispose to stop both and remove their data. */
export interface StandbyPair extends AsyncDisposable {
  primary: EmbeddedPostgres;
  standby: EmbeddedPostgres;
  /** The standby's physical slot on the primary. */
  slot: string;
}

/** Copies `from` to `to` with modes and owners kept (the postgres user must own its data). */
async function copyTree(from: string, to: string): Promise<void> {
  const { success, stderr } = await new Deno.Command("cp", { args: ["-a", from, to] }).output();
  if (!success) throw new Error(`cp -a failed: ${new TextDecoder().decode(stderr)}`);
}

/**
 * Starts a primary (with `setup` run on it first) and a standby streaming
 * from it through the physical slot `standby1`; resolves once the standby
 * has replayed everything the primary had.
 */
export async function startStandbyPair(
  setup: string,
  options: { syncSlots: boolean },
): Promise<StandbyPair> {
  const primary = await startPostgres({
    settings: { wal_level: "logical", hot_standby: "on", wal_keep_size: "256MB" },
  });
  const slot = "standby1";
  try {
    await sql(primary.database, setup);
    await primary.stop();
    const standbyDir = `${primary.dataDir}-standby`;
    await copyTree(primary.dataDir, standbyDir);
    await Deno.writeTextFile(`${standbyDir}/standby.signal`, "");
    const user = await serverUser();
    if (user !== undefined) await Deno.chown(`${standbyDir}/standby.signal`, user.uid, user.gid);
    await primary.startAgain();
    // Made after the copy, so that the standby has no copy of its own slot, nor (once promoted) of
    // a synchronized_standby_slots naming a standby it does not have.
    await sql(primary.database, `SELECT pg_create_physical_replication_slot('${slot}', true)`);
    if (options.syncSlots) {
      await sql(primary.database, `ALTER SYSTEM SET synchronized_standby_slots = '${slot}'`);
      await sql(primary.database, "SELECT pg_reload_conf()");
    }
    const standby = await EmbeddedPostgres.start({
      dataDir: standbyDir,
      settings: {
        fsync: "off",
        hot_standby: "on",
        hot_standby_feedback: "on",
        primary_conninfo:
          `host=127.0.0.1 port=${primary.port} user=postgres dbname=postgres application_name=${slot}`,
        primary_slot_name: slot,
        ...(options.syncSlots ? { sync_replication_slots: "on" } : {}),
      },
    });
    await waitForSql(
      primary.database,
      "SELECT count(*) = 1 AS ok FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
      [slot],
    );
    return {
      primary,
      standby,
      slot,
      async [Symbol.asyncDispose]() {
        await standby.stop("immediate").catch(() => {});
        await Deno.remove(standbyDir, { recursive: true }).catch(() => {});
        await primary[Symbol.asyncDispose]().catch(() => {});
      },
    };
  } catch (error) {
    await primary[Symbol.asyncDispose]();
    throw error;
  }
}

/** `host:port` of each server, for a multi-host URL. */
export function hostOf(db: DatabaseConfig): string {
  return `${db.host}:${db.port}`;
}
