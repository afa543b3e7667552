import assert from "node:assert/strict";
import pg from "pg";
import { init, sql, startApi, startPostgres } from "./support/harness.ts";

Deno.test("an init that fails after creating its slot leaves no slot behind", async () => {
  // Walsenders do not count against max_connections: with every ordinary connection taken, init can
  // still create its slot, and then fails to open the connection that holds the slot's snapshot.
  await using postgres = await startPostgres({
    settings: { max_connections: "10", superuser_reserved_connections: "0" },
  });
  const db = postgres.database;
  await using api = await startApi(db);
  // The server's pool keeps the connection it set up the schema with; every other one is taken.
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
  let status;
  let recorded: { slot_name: string }[];
  let orphans: { slot_name: string }[];
  try {
    const response = await fetch(new URL("/v1/init", api.url));
    status = response.status;
    await response.body?.cancel();
    orphans = (await fillers[0].query(
      `SELECT slot_name FROM pg_replication_slots s
        WHERE NOT EXISTS (SELECT 1 FROM pgdeltastream.slots o WHERE o.slot_name = s.slot_name)`,
    )).rows;
    recorded = (await fillers[0].query("SELECT slot_name FROM pgdeltastream.slots")).rows;
  } finally {
    await Promise.all(fillers.map((client: pg.Client) => client.end()));
  }
  assert.equal(status, 503, "too many connections is the database's state: retry later");
  assert.deepEqual(orphans, [], "a slot exists that pgdeltastream does not know is its own");
  assert.deepEqual(recorded, [], "the failed init's slot is gone, and so is its record");
  // With connections free again, init works.
  assert.match(await init(api.url), /^delta_/);
});
