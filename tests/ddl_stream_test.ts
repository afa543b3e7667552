import assert from "node:assert/strict";
import { sql, startApi, startPostgres } from "./support/harness.ts";
import { streamWorkload } from "./support/reference.ts";

const SETUP = "CREATE TABLE evolving(id int primary key, a text)";

/** Each statement, and the one change it must stream (table, column names, types, values), if any. */
const WORKLOAD: [string, [string, string[], string[], unknown[]] | null][] = [
  ["INSERT INTO evolving VALUES (1, 'a')", ["evolving", ["id", "a"], ["integer", "text"], [
    1,
    "a",
  ]]],
  ["ALTER TABLE evolving ADD COLUMN b int", null],
  ["INSERT INTO evolving VALUES (2, 'b', 2)", [
    "evolving",
    ["id", "a", "b"],
    ["integer", "text", "integer"],
    [2, "b", 2],
  ]],
  ["ALTER TABLE evolving DROP COLUMN a", null],
  ["INSERT INTO evolving VALUES (3, 3)", ["evolving", ["id", "b"], ["integer", "integer"], [3, 3]]],
  ["ALTER TABLE evolving ALTER COLUMN b TYPE bigint", null],
  ["INSERT INTO evolving VALUES (4, 4)", ["evolving", ["id", "b"], ["integer", "bigint"], [4, 4]]],
  ["ALTER TABLE evolving ALTER COLUMN b TYPE varchar(10)", null],
  ["INSERT INTO evolving VALUES (5, '5')", [
    "evolving",
    ["id", "b"],
    ["integer", "character varying(10)"],
    [5, "5"],
  ]],
  // No rewrite, only the type modifier changes.
  ["ALTER TABLE evolving ALTER COLUMN b TYPE varchar(20)", null],
  ["INSERT INTO evolving VALUES (6, '6')", [
    "evolving",
    ["id", "b"],
    ["integer", "character varying(20)"],
    [6, "6"],
  ]],
  ["ALTER TABLE evolving RENAME COLUMN b TO c", null],
  ["INSERT INTO evolving VALUES (7, '7')", [
    "evolving",
    ["id", "c"],
    ["integer", "character varying(20)"],
    [7, "7"],
  ]],
  ["ALTER TABLE evolving RENAME TO evolved", null],
  ["INSERT INTO evolved VALUES (8, '8')", [
    "evolved",
    ["id", "c"],
    ["integer", "character varying(20)"],
    [8, "8"],
  ]],
  ["CREATE TABLE born_later(id int primary key, v text)", null],
  ["INSERT INTO born_later VALUES (1, 'new')", [
    "born_later",
    ["id", "v"],
    ["integer", "text"],
    [1, "new"],
  ]],
];

Deno.test("after DDL while streaming, each frame carries the table's new shape", async () => {
  await using postgres = await startPostgres();
  await using api = await startApi(postgres.database);
  const frames = await streamWorkload(
    postgres.database,
    api.url,
    SETUP,
    WORKLOAD.map(([statement]) => statement),
  );
  const changes = frames.flatMap((frame) => JSON.parse(frame).change);
  assert.deepEqual(
    changes.map((c) => [c.table, c.columnnames, c.columntypes, c.columnvalues]),
    WORKLOAD.flatMap(([, change]) => change === null ? [] : [change]),
  );
});

/** Debian's PostgreSQL 15 with wal2json (`apt-get install postgresql-15-wal2json`; .ci/run does it as root). */
const PG15_BIN = "/usr/lib/postgresql/15/bin";
const haveWal2json = await Deno.stat("/usr/lib/postgresql/15/lib/wal2json.so").then(
  () => true,
  () => false,
);

Deno.test({
  name: "after DDL while streaming, frames equal live wal2json output byte for byte",
  ignore: !haveWal2json,
  async fn() {
    await using postgres = await startPostgres({ binDir: PG15_BIN });
    const db = postgres.database;
    await using api = await startApi(db);
    const received = await streamWorkload(
      db,
      api.url,
      SETUP,
      WORKLOAD.map(([statement]) => statement),
      () => sql(db, "SELECT pg_create_logical_replication_slot('w2j', 'wal2json')"),
    );
    const wal2json = (await sql<{ data: string }>(
      db,
      `SELECT data FROM pg_logical_slot_get_changes('w2j', NULL, NULL, 'include-lsn', 'on', 'pretty-print', 'off')`,
    )).map((row) => row.data).filter((frame) =>
      !frame.endsWith('"change":[]}') && !frame.includes('"schema":"pgdeltastream"')
    );
    assert.deepEqual(
      received,
      wal2json.slice(0, wal2json.findIndex((frame) => frame.includes('"table":"sentinel"'))),
    );
  },
});
