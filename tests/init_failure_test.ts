import assert from "node:assert/strict";
import pg from "pg";
import type { DatabaseConfig } from "../src/config.ts";
import { init, sql, startApi, startPostgres } from "./support/harness.ts";

/**
 * Runs `work` while every ordinary connection but the server pool's idle one is taken, with one
 * of the takers to query from. Walsenders do not count against max_connections: with every
 * ordinary connection taken, the server can still create a slot, and then fails to open the
 * connection that holds the slot's snapshot.
 */
async function withConnectionsTaken<T>(
  db: DatabaseConfig,
  work: (observer: pg.Client) => Promise<T>,
): Promise<T> {
  const [{ free }] = await sql<{ free: number }>(
    db,
    `SELECT current_setting('max_connections')::int - count(*)::int + 1 AS free
       FROM pg_stat_activity WHERE backend_type = 'client backend'`,
  );
  const fillers = await Promise.all(Array.from({ length: free }, async () => {
    const client = new pg.Client(db);
    await client.connect();
    return client;
  }));
  try {
    return await work(fillers[0]);
  } finally {
    await Promise.all(fillers.map((client: pg.Client) => client.end()));
  }
}

const ORPHANS = `SELECT slot_name FROM pg_replication_slots s
  WHERE NOT EXISTS (SELECT 1 FROM pgdeltastream.slots o WHERE o.slot_name = s.slot_name)
    AND NOT EXISTS (SELECT 1 FROM pgdeltastream.streams o WHERE o.slot_name = s.slot_name)`;

const FEW_CONNECTIONS = { max_connections: "10", superuser_reserved_connections: "0" };

Deno.test("an init that fails after creating its slot leaves no slot behind", async () => {
  await using postgres = await startPostgres({ settings: FEW_CONNECTIONS });
  const db = postgres.database;
  await using api = await startApi(db);
  const { status, recorded, orphans } = await withConnectionsTaken(db, async (observer) => {
    const response = await fetch(new URL("/v1/init", api.url));
    await response.body?.cancel();
    return {
      status: response.status,
      orphans: (await observer.query(ORPHANS)).rows,
      recorded: (await observer.query("SELECT slot_name FROM pgdeltastream.slots")).rows,
    };
  });
  assert.equal(status, 503, "too many connections is the database's state: retry later");
  assert.deepEqual(orphans, [], "a slot exists that pgdeltastream does not know is its own");
  assert.deepEqual(recorded, [], "the failed init's slot is gone, and so is its record");
  // With connections free again, init works.
  assert.match(await init(api.url), /^delta_/);
});

Deno.test("a stream whose creation fails after its slot exists leaves nothing behind", async () => {
  await using postgres = await startPostgres({ settings: FEW_CONNECTIONS });
  const db = postgres.database;
  await sql(db, "CREATE TABLE t(id int primary key, region text)");
  await using api = await startApi(db);
  const create = () =>
    fetch(new URL("/v2/streams", api.url), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "s", tables: [{ table: "t", where: [["region", "=", "eu"]] }] }),
    });
  const { status, error, orphans, recorded, publications } = await withConnectionsTaken(
    db,
    async (observer) => {
      const response = await create();
      return {
        status: response.status,
        error: (await response.json()).error,
        orphans: (await observer.query(ORPHANS)).rows,
        recorded: (await observer.query("SELECT name FROM pgdeltastream.streams")).rows,
        publications: (await observer.query(
          "SELECT pubname FROM pg_publication WHERE pubname LIKE 'pgds\\_%'",
        )).rows,
      };
    },
  );
  assert.equal(status, 503, error);
  assert.deepEqual(orphans, [], "a slot exists that pgdeltastream does not know is its own");
  assert.deepEqual(recorded, [], "the failed stream's record is gone");
  assert.deepEqual(publications, [], "and so is its insert publication");
  // With connections free again, the same name can be created.
  const again = await create();
  assert.equal(again.status, 201, await again.text());
});
