/**
 * Whether the server's slots can outlive a failover of the database, as far
 * as the primary shows it: PostgreSQL 17's failover slots, kept by a
 * standby with `sync_replication_slots = on`, and `synchronized_standby_slots`,
 * which makes the primary send logical changes only once those standbys have
 * them (so that a promoted standby never lacks a change a consumer was sent).
 * @module
 */

import type pg from "pg";
import type { FailoverReadiness } from "../protocol.ts";

/** The readiness of the database `pool` reaches, for the slots recorded in `schema`. */
export async function failoverReadiness(pool: pg.Pool, schema: string): Promise<FailoverReadiness> {
  const { rows: [facts] } = await pool.query<{ version: number; standby_slots: string | null }>(
    `SELECT current_setting('server_version_num')::int AS version,
            current_setting('synchronized_standby_slots', true) AS standby_slots`,
  );
  const supported = facts.version >= 170000;
  const standbySlots = String(facts.standby_slots ?? "").split(",").map((s: string) => s.trim())
    .filter(Boolean);
  const { rows: standbys } = await pool.query<{ slot: string; exists: boolean; active: boolean }>(
    `SELECT n AS slot, s.slot_name IS NOT NULL AS exists, coalesce(s.active, false) AS active
       FROM unnest($1::text[]) n
       LEFT JOIN pg_replication_slots s ON s.slot_name = n AND s.slot_type = 'physical'`,
    [standbySlots],
  );
  const notFailover = supported
    ? (await pool.query<{ slot_name: string }>(
      `SELECT s.slot_name::text FROM pg_replication_slots s
        WHERE s.slot_type = 'logical' AND NOT s.failover
          AND (s.slot_name IN (SELECT slot_name FROM ${schema}.slots)
               OR s.slot_name IN (SELECT slot_name FROM ${schema}.streams))`,
    )).rows.map((r: { slot_name: string }) => r.slot_name)
    : [];
  const problems: string[] = [];
  if (!supported) {
    problems.push(
      "PostgreSQL before 17 has no failover slots: after a failover every stream's slot is gone, " +
        "and each stream is invalidated (4410) until it is reset",
    );
  } else {
    if (standbySlots.length === 0) {
      problems.push(
        "synchronized_standby_slots is not set on the primary: a standby can be promoted without " +
          "changes consumers were sent, and without the slots' latest positions; set it to the " +
          "standbys' physical slots",
      );
    }
    for (const standby of standbys) {
      if (!standby.exists) {
        problems.push(`synchronized_standby_slots names ${standby.slot}, which does not exist`);
      } else if (!standby.active) {
        problems.push(
          `standby slot ${standby.slot} is not active: PostgreSQL holds logical changes back until ` +
            "that standby is connected again",
        );
      }
    }
    if (notFailover.length > 0) {
      problems.push(`not failover slots yet (held by a walsender): ${notFailover.join(", ")}`);
    }
  }
  return {
    supported,
    synchronizedStandbySlots: standbySlots,
    standbys,
    notFailover,
    ready: problems.length === 0,
    problems,
  };
}
