import assert from "node:assert/strict";
import { BLOCKS_PER_RANGE } from "../src/snapshots/snapshot_export.ts";
import { init, postJson, sql, startApi, startPostgres } from "./support/harness.ts";

/** Rows that need more block ranges than there are readers: each reader copies range after range. */
const ROWS = 90_000;
const READERS = 2;

Deno.test("an export returns every row of the snapshot once, read in parallel or in order", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE wide(id int primary key, pad text, odd text);
     INSERT INTO wide SELECT g, repeat('p', 300), CASE WHEN g % 1000 = 0 THEN E'tab\\t "quote" \\\\ é' END
       FROM generate_series(1, ${ROWS}) g;
     CREATE TABLE parted(id int, region text) PARTITION BY LIST (region);
     CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
     CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
     INSERT INTO parted SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END FROM generate_series(1, 5000) g;
     CREATE TABLE empty(id int primary key);`,
  );
  const [{ blocks }] = await sql<{ blocks: number }>(
    db,
    "SELECT (pg_relation_size('wide') / 8192)::int AS blocks",
  );
  assert.ok(blocks > (READERS + 1) * BLOCKS_PER_RANGE, `wide has ${blocks} blocks`);
  await using api = await startApi(db, { exportReaders: READERS });
  const slotName = await init(api.url);
  await sql(db, "DELETE FROM wide WHERE id <= 10; INSERT INTO parted VALUES (0, 'eu')");
  const exported = async (body: Record<string, unknown>) => {
    const response = await postJson(new URL("/v1/snapshot/export", api.url), { slotName, ...body });
    assert.equal(response.status, 200, response.text);
    return response.text.trimEnd().split("\n").map((line) => JSON.parse(line));
  };

  await t.step(
    "in parallel: every row once, as the pages write it, as of the snapshot",
    async () => {
      const rows = await exported({ table: "wide" });
      assert.equal(rows.length, ROWS);
      const ids = new Set(rows.map((row) => row.id));
      assert.equal(ids.size, ROWS);
      const page = await postJson(new URL("/v1/snapshot/data", api.url), {
        slotName,
        table: "wide",
        limit: 3,
        after: 999,
      });
      const byId = new Map(rows.map((row) => [row.id, row]));
      for (const row of JSON.parse(page.text)) assert.deepEqual(byId.get(row.id), row);
      assert.equal(byId.get(1000).odd, 'tab\t "quote" \\ é');
    },
  );

  await t.step("with order_by: one reader, in that order", async () => {
    const rows = await exported({ table: "wide", order_by: { column: "id", order: "DESC" } });
    assert.deepEqual(rows.map((row) => row.id), Array.from({ length: ROWS }, (_, i) => ROWS - i));
  });

  await t.step("a partitioned table: every partition's rows", async () => {
    const rows = await exported({ table: "parted" });
    assert.deepEqual(
      rows.map((row) => row.id).sort((a, b) => a - b),
      Array.from({ length: 5000 }, (_, i) => i + 1),
    );
  });

  await t.step("an empty table: an empty body", async () => {
    const response = await postJson(new URL("/v1/snapshot/export", api.url), {
      slotName,
      table: "empty",
    });
    assert.equal(response.status, 200);
    assert.equal(response.text, "");
  });
});

Deno.test("an exported row is the same bytes as the stream writes for it, whatever its characters", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  // Every ASCII character (control characters, tab, newline, quotes, backslash), non-ASCII ones,
  // and the values COPY's text format escapes or marks specially.
  await sql(
    db,
    `CREATE TABLE chars(id int primary key, t text, n numeric, f float8, b bytea, ok boolean, d date);
     INSERT INTO chars SELECT g, chr(g), g / 3.0, g / 7.0, decode(lpad(to_hex(g), 2, '0'), 'hex'),
                              g % 2 = 0, date '2020-01-01' + g FROM generate_series(1, 127) g;
     INSERT INTO chars VALUES (200, E'tab\\there\\nnew "q" \\\\ back é 😀 \\u2028', 'NaN', '-Infinity',
                               '\\x', NULL, NULL),
                              (201, '\\N', NULL, 'Infinity', NULL, true, 'infinity'),
                              (202, '', 1e-30, '-0', '\\x00ff', false, '0044-03-15 BC')`,
  );
  await using api = await startApi(db);
  const slotName = await init(api.url);
  const body = { slotName, table: "chars", order_by: { column: "id" } };
  const exported = await postJson(new URL("/v1/snapshot/export", api.url), body);
  assert.equal(exported.status, 200, exported.text);
  const page = await postJson(new URL("/v1/snapshot/data", api.url), { ...body, limit: 1000 });
  // Pages are JSON that PostgreSQL builds with wal2json's rules; the export's are the server's.
  const rows = exported.text.trimEnd().split("\n");
  assert.equal(rows.length, 130);
  assert.equal(`[${rows.join(",")}]`, page.text);
});
