import assert from "node:assert/strict";
import pg from "pg";
import { deadline, poll } from "./support/deadline.ts";
import { init, postJson, sql, startApi, startPostgres } from "./support/harness.ts";

const SETUP = `
CREATE TABLE t(id int primary key, v text);
INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g;
CREATE TABLE big(id int primary key, pad text);
INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g;
CREATE TABLE parted(id int, region text) PARTITION BY LIST (region);
CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
INSERT INTO parted VALUES (1, 'eu'), (2, 'us');
CREATE VIEW a_view AS SELECT * FROM t;
CREATE MATERIALIZED VIEW a_matview AS SELECT * FROM t;
CREATE SEQUENCE a_sequence;
CREATE UNLOGGED TABLE an_unlogged(id int primary key);
`;

/** Statements that need a lock a held snapshot must not keep; each is given 3 s to get it. */
const DDL = [
  "ALTER TABLE t ADD COLUMN added int",
  "CREATE INDEX ON t (v)",
  "VACUUM FULL parted_eu",
  "TRUNCATE big",
];

async function withLockTimeout(db: pg.ClientConfig, statement: string): Promise<void> {
  const client = new pg.Client(db);
  await client.connect();
  try {
    await client.query("SET lock_timeout = '3s'");
    await client.query(statement);
  } finally {
    await client.end();
  }
}

/**
 * Starts an export of table `big` of `slotName`'s snapshot, reads its first chunk and then stops
 * reading: an export that stalls, holding its reader connection. Returns its reader, to cancel.
 */
async function stalledExport(
  base: URL,
  slotName: string,
): Promise<ReadableStreamDefaultReader<Uint8Array>> {
  const stalled = await fetch(new URL("/v1/snapshot/export", base), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ slotName, table: "big" }),
  });
  assert.equal(stalled.status, 200);
  const reader = stalled.body!.getReader();
  await reader.read();
  return reader;
}

Deno.test("snapshot reads hold no lock between requests, and never return rows that changed under them", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  const url = (path: string) => new URL(path, api.url);
  const page = (body: Record<string, unknown>) => postJson(url("/v1/snapshot/data"), body);

  await t.step("after a page of every table, no lock on any of them is left", async () => {
    const slotName = await init(api.url);
    for (const table of ["t", "big", "parted"]) {
      assert.equal((await page({ slotName, table, limit: 10 })).status, 200, table);
    }
    const exported = await postJson(url("/v1/snapshot/export"), { slotName, table: "t" });
    assert.equal(exported.status, 200);
    const locks = await sql<{ relation: string }>(
      db,
      `SELECT l.relation::regclass::text AS relation FROM pg_locks l
         JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND l.pid <> pg_backend_pid()`,
    );
    assert.deepEqual(locks, [], "locks on user tables held by someone");
    for (const statement of DDL) await withLockTimeout(db, statement);
  });

  await t.step("a table truncated after the snapshot answers 409, not an empty page", async () => {
    await sql(db, "INSERT INTO big SELECT g, 'y' FROM generate_series(1, 10) g");
    const slotName = await init(api.url);
    await withLockTimeout(db, "TRUNCATE big");
    for (const path of ["/v1/snapshot/data", "/v1/snapshot/export"]) {
      const response = await postJson(url(path), { slotName, table: "big" });
      assert.equal(response.status, 409, `${path}: ${response.text}`);
      assert.match(
        JSON.parse(response.text).error,
        /big was truncated or rewritten .*after the snapshot.*\/v1\/init/,
      );
    }
  });

  await t.step("a table rewritten by VACUUM FULL after the snapshot answers 409", async () => {
    const slotName = await init(api.url);
    await withLockTimeout(db, "VACUUM FULL t");
    const response = await page({ slotName, table: "t" });
    assert.equal(response.status, 409, response.text);
  });

  await t.step("a partition truncated after the snapshot makes its parent answer 409", async () => {
    const slotName = await init(api.url);
    await withLockTimeout(db, "TRUNCATE parted_us");
    assert.equal((await page({ slotName, table: "parted" })).status, 409);
    assert.equal((await page({ slotName, table: "parted_eu" })).status, 200);
  });

  await t.step("a column added after the snapshot is not in its rows", async () => {
    const slotName = await init(api.url);
    await withLockTimeout(db, "ALTER TABLE t ADD COLUMN later int DEFAULT 7");
    const response = await page({ slotName, table: "t", limit: 1 });
    assert.equal(response.status, 200, response.text);
    assert.deepEqual(Object.keys(JSON.parse(response.text)[0]), ["id", "v", "added"]);
  });

  await t.step("a column dropped or renamed after the snapshot answers 409", async () => {
    const slotName = await init(api.url);
    await withLockTimeout(db, "ALTER TABLE t DROP COLUMN added");
    const dropped = await page({ slotName, table: "t" });
    assert.equal(dropped.status, 409, dropped.text);
    assert.match(JSON.parse(dropped.text).error, /column "added" of public\.t was dropped/);
    const renamedSlot = await init(api.url);
    await withLockTimeout(db, "ALTER TABLE t RENAME COLUMN later TO v2");
    const renamed = await page({ slotName: renamedSlot, table: "t" });
    assert.equal(renamed.status, 409, renamed.text);
  });

  await t.step("a table dropped after the snapshot answers 409", async () => {
    await sql(db, "CREATE TABLE doomed(id int primary key); INSERT INTO doomed VALUES (1)");
    const slotName = await init(api.url);
    await withLockTimeout(db, "DROP TABLE doomed");
    const response = await page({ slotName, table: "doomed" });
    assert.equal(response.status, 409, response.text);
    assert.match(JSON.parse(response.text).error, /doomed was dropped/);
  });

  await t.step(
    "system catalogs, the server's own schema and non-tables are 404, as a missing table is",
    async () => {
      const slotName = await init(api.url);
      const missing = JSON.parse((await page({ slotName, table: "no_such_table" })).text).error;
      for (
        const table of [
          "pg_catalog.pg_authid",
          "pg_authid",
          "pg_class",
          "information_schema.tables",
          "pg_toast.pg_toast_1260",
          "pgdeltastream.slots",
          "a_view",
          "a_matview",
          "a_sequence",
          "an_unlogged",
        ]
      ) {
        for (const path of ["/v1/snapshot/data", "/v1/snapshot/export"]) {
          const response = await postJson(url(path), { slotName, table });
          assert.equal(response.status, 404, `${path} ${table}: ${response.text}`);
          assert.equal(
            JSON.parse(response.text).error,
            missing.replace("no_such_table", table),
            `${table} is answered exactly as a missing table`,
          );
        }
      }
    },
  );

  await t.step(
    "a stalled export blocks neither init, nor other reads, nor the table's DDL after release",
    async () => {
      await sql(db, "INSERT INTO big SELECT g, repeat('z', 500) FROM generate_series(1, 50000) g");
      const slotName = await init(api.url);
      const reader = await stalledExport(api.url, slotName); // now stop reading it
      // Other reads of the same snapshot go on beside it.
      assert.equal((await page({ slotName, table: "t", limit: 5 })).status, 200);
      // A new init releases the snapshot at once: it does not wait for the export's reader.
      const next = await deadline(
        init(api.url),
        "an init while an export of the previous slot stalls",
      );
      assert.notEqual(next, slotName);
      // The stalled export was cut off with its snapshot, so its lock is gone too.
      await deadline(
        withLockTimeout(db, "ALTER TABLE big ADD COLUMN after_release int"),
        "DDL on the exported table",
      );
      await reader.cancel().catch(() => {});
    },
  );
});

Deno.test("shutdown does not wait for a stalled export", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  const api = await startApi(db);
  const slotName = await init(api.url);
  const reader = await stalledExport(api.url, slotName); // now stop reading it
  await deadline(api[Symbol.asyncDispose](), "the server to shut down while an export stalls");
  // The client that stalled lets go, and its response ends with it.
  await reader.cancel().catch(() => {});
  await deadline(api.finished, "the stalled export's response to end once its client let go");
});

Deno.test("a stalled export holds its reader connection, never the server: reads wait, then 503 or 410", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  // One reader connection, so that one stalled export holds all of them.
  await using api = await startApi(db, { snapshotReaders: 1, snapshotReaderWaitMs: 1500 });
  const url = (path: string) => new URL(path, api.url);
  const slotName = await init(api.url);
  const reader = await stalledExport(api.url, slotName); // now stop reading it

  await t.step("a read that finds no free reader connection in time answers 503", async () => {
    const response = await deadline(
      postJson(url("/v1/snapshot/data"), { slotName, table: "t", limit: 1 }),
      "a page read while every reader connection is held",
    );
    assert.equal(response.status, 503);
    assert.match(
      JSON.parse(response.text).error,
      /no snapshot reader connection.*SNAPSHOT_READERS/,
    );
  });

  await t.step("a read waiting for a connection when its snapshot goes answers 410", async () => {
    const waiting = postJson(url("/v1/snapshot/data"), { slotName, table: "t", limit: 1 });
    await poll(
      () => api.app.snapshots.readsWaiting === 1,
      "the read to queue for the one reader connection",
    );
    await deadline(init(api.url), "an init (which releases the old snapshot)");
    const response = await deadline(waiting, "the waiting read to be answered");
    assert.equal(response.status, 410);
    assert.match(JSON.parse(response.text).error, /no longer available/);
  });
  await reader.cancel().catch(() => {});
});

Deno.test("a snapshot's time-to-live ends it even while its export stalls, and frees the table", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db, { snapshotTtlSeconds: 2 });
  const url = (path: string) => new URL(path, api.url);
  const slotName = await init(api.url);
  const reader = await stalledExport(api.url, slotName); // now stop reading it
  await poll(
    async () => {
      const response = await postJson(url("/v1/snapshot/data"), { slotName, table: "t" });
      const body = JSON.parse(response.text);
      return response.status === 410 && /time-to-live/.test(body.error) ? true : undefined;
    },
    "the snapshot to expire (410 naming its time-to-live) while its export stalls",
  );
  await deadline(
    withLockTimeout(db, "ALTER TABLE big ADD COLUMN after_ttl int"),
    "DDL on the table whose export stalled",
  );
  await reader.cancel().catch(() => {});
});
