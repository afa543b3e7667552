import assert from "node:assert/strict";
import { type Change, CloseCode } from "../src/protocol.ts";
import { createStream, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

/** The changes of the next frame, as `kind table` plus the schema change's columns. */
async function nextChanges(client: StreamClient): Promise<Change[]> {
  const frame = await client.nextV2();
  client.ack(frame.nextlsn);
  return frame.change;
}

Deno.test("v2 streams carry truncations and the shape of their tables", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE parent(id int primary key);
     CREATE TABLE child(id int primary key, parent int REFERENCES parent);
     CREATE TABLE other(id int primary key);
     CREATE TABLE shaped(id int primary key, a text);
     CREATE TABLE narrow(id int primary key, a text, b text);
     INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1); INSERT INTO other VALUES (1);`,
  );
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "all",
    tables: ["parent", "child", "shaped", { table: "narrow", columns: ["id", "a"] }],
  });
  await createStream(api.url, {
    name: "no-truncates",
    tables: ["parent", "child"],
    operations: ["insert", "delete"],
  });
  await using all = await StreamClient.changes(api.url, "all");
  await using noTruncates = await StreamClient.changes(api.url, "no-truncates");

  await t.step("the first change of a table in a session comes after its shape", async () => {
    await sql(db, "INSERT INTO shaped VALUES (1, 'x')");
    assert.deepEqual(await nextChanges(all), [
      {
        kind: "schema",
        schema: "public",
        table: "shaped",
        columnnames: ["id", "a"],
        columntypes: ["integer", "text"],
        keynames: ["id"],
      },
      {
        kind: "insert",
        schema: "public",
        table: "shaped",
        columnnames: ["id", "a"],
        columntypes: ["integer", "text"],
        columnvalues: [1, "x"],
      },
    ]);
  });

  await t.step("TRUNCATE is sent as a truncate change; CASCADE lists every table", async () => {
    await sql(db, "TRUNCATE parent CASCADE");
    const changes = await nextChanges(all);
    assert.deepEqual(
      changes.filter((c) => c.kind === "truncate").map((c) => c.table).sort(),
      ["child", "parent"],
    );
    await sql(db, "TRUNCATE other; INSERT INTO parent VALUES (2)");
    const after = await nextChanges(all);
    assert.ok(!after.some((c) => c.kind === "truncate"), "a table outside the stream is not sent");
    // A stream without truncate among its operations does not get them.
    const skipped = await nextChanges(noTruncates);
    assert.deepEqual(skipped.filter((c) => c.kind !== "schema").map((c) => c.kind), ["insert"]);
  });

  await t.step(
    "a column added, retyped or dropped: the new shape comes before the first change with it",
    async () => {
      await sql(db, "ALTER TABLE shaped ADD COLUMN b int; INSERT INTO shaped VALUES (2, 'y', 2)");
      assert.deepEqual(
        (await nextChanges(all)).map((
          c,
        ) => [c.kind, (c as { columnnames?: string[] }).columnnames]),
        [["schema", ["id", "a", "b"]], ["insert", ["id", "a", "b"]]],
      );
      await sql(
        db,
        "ALTER TABLE shaped ALTER COLUMN b TYPE bigint; ALTER TABLE shaped DROP COLUMN a",
      );
      await sql(db, "INSERT INTO shaped VALUES (3, 3)");
      const changes = await nextChanges(all);
      assert.deepEqual(changes[0], {
        kind: "schema",
        schema: "public",
        table: "shaped",
        columnnames: ["id", "b"],
        columntypes: ["integer", "bigint"],
        keynames: ["id"],
      });
      assert.equal(changes[1].kind, "insert");
    },
  );

  await t.step(
    "a renamed table: the schema change carries the new name; the stream keeps it",
    async () => {
      await sql(db, "ALTER TABLE shaped RENAME TO reshaped; INSERT INTO reshaped VALUES (4, 4)");
      assert.deepEqual(
        (await nextChanges(all)).map((c) => [c.kind, c.table]),
        [["schema", "reshaped"], ["insert", "reshaped"]],
      );
    },
  );

  await t.step("a column the stream leaves out changes nothing it sees", async () => {
    await sql(db, "INSERT INTO narrow VALUES (1, 'a', 'b')");
    assert.deepEqual((await nextChanges(all)).map((c) => c.kind), ["schema", "insert"]);
    await sql(
      db,
      "ALTER TABLE narrow ADD COLUMN c int; INSERT INTO narrow VALUES (2, 'a', 'b', 3)",
    );
    const changes = await nextChanges(all);
    assert.deepEqual(
      changes.map((c) => c.kind),
      ["insert"],
      "no schema change: id and a are as they were",
    );
  });

  await t.step(
    "a column of the stream's own list that is dropped: announced, then absent",
    async () => {
      await sql(db, "ALTER TABLE narrow DROP COLUMN a; INSERT INTO narrow VALUES (3, 'b', 3)");
      const changes = await nextChanges(all);
      assert.deepEqual(
        changes.map((c) => [c.kind, (c as { columnnames?: string[] }).columnnames]),
        [
          ["schema", ["id"]],
          ["insert", ["id"]],
        ],
      );
      // The definition keeps the list it was created with; a column of that name added again
      // is carried again, announced first.
      const response = await fetch(new URL("/v2/streams/all", api.url));
      const { tables } = await response.json();
      assert.deepEqual(tables.find((t: { table: string }) => t.table === "narrow").columns, [
        "id",
        "a",
      ]);
      await sql(
        db,
        "ALTER TABLE narrow ADD COLUMN a text; INSERT INTO narrow VALUES (4, 'b', 4, 'x')",
      );
      const again = await nextChanges(all);
      assert.deepEqual(again.map((c) => [c.kind, (c as { columnnames?: string[] }).columnnames]), [
        ["schema", ["id", "a"]],
        ["insert", ["id", "a"]],
      ]);
      assert.deepEqual((again[1] as { columnvalues: unknown[] }).columnvalues, [4, "x"]);
    },
  );

  await t.step("a dropped table leaves the stream working for its other tables", async () => {
    await sql(db, "DROP TABLE narrow; INSERT INTO parent VALUES (3)");
    assert.deepEqual(
      (await nextChanges(all)).filter((c) => c.kind !== "schema").map((c) => [c.kind, c.table]),
      [["insert", "parent"]],
    );
  });
});

Deno.test("a stream whose filter names a column that was dropped stops with 4422, saying so", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE regional(id int primary key, region text)");
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "eu-only",
    tables: [{ table: "regional", where: [["region", "=", "eu"]] }],
  });
  {
    await using client = await StreamClient.changes(api.url, "eu-only");
    await sql(db, "INSERT INTO regional VALUES (1, 'eu')");
    assert.equal((await nextChanges(client)).filter((c) => c.kind === "insert").length, 1);
    const [{ version }] = await sql<{ version: number }>(
      db,
      "SELECT current_setting('server_version_num')::int AS version",
    );
    if (version >= 150000) {
      // PostgreSQL filters on the column (the stream's publication's WHERE): it keeps it.
      await assert.rejects(
        sql(db, "ALTER TABLE regional DROP COLUMN region"),
        /cannot drop column region of table regional because other objects depend on it/,
      );
      await sql(
        db,
        "ALTER TABLE regional DROP COLUMN region CASCADE; INSERT INTO regional VALUES (2)",
      );
      const closed = await client.closedWithin();
      assert.equal(closed.code, CloseCode.DefinitionBroken);
      assert.match(closed.reason, /public\.regional left the stream's publication.*eu-only/);
    } else {
      await sql(db, "ALTER TABLE regional DROP COLUMN region; INSERT INTO regional VALUES (2)");
      const closed = await client.closedWithin();
      assert.equal(closed.code, CloseCode.DefinitionBroken);
      assert.match(closed.reason, /filter column "region" of regional was dropped.*eu-only/);
    }
  }
  // It does not send the row it cannot judge on a reconnect either.
  await using again = await StreamClient.changes(api.url, "eu-only");
  assert.equal((await again.closedWithin()).code, CloseCode.DefinitionBroken);
});

Deno.test("a stream whose filter column is renamed or retyped stops with 4422 too", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    "CREATE TABLE renamed(id int primary key, region text); CREATE TABLE retyped(id int primary key, n int)",
  );
  const [{ version }] = await sql<{ version: number }>(
    db,
    "SELECT current_setting('server_version_num')::int AS version",
  );
  await using api = await startApi(db);

  await t.step("a renamed filter column", async () => {
    await createStream(api.url, {
      name: "renamed",
      tables: [{ table: "renamed", where: [["region", "=", "eu"]] }],
    });
    await using client = await StreamClient.changes(api.url, "renamed");
    await sql(
      db,
      "ALTER TABLE renamed RENAME COLUMN region TO area; INSERT INTO renamed VALUES (2, 'eu')",
    );
    const closed = await client.closedWithin();
    assert.equal(closed.code, CloseCode.DefinitionBroken, closed.reason);
    assert.match(closed.reason, /filter column "region" of renamed was dropped or renamed/);
  });

  await t.step("a retyped filter column", async () => {
    await createStream(api.url, {
      name: "retyped",
      tables: [{ table: "retyped", where: [["n", ">", 1]] }],
    });
    await using client = await StreamClient.changes(api.url, "retyped");
    const retype = "ALTER TABLE retyped ALTER COLUMN n TYPE bigint";
    if (version >= 150000) {
      // The stream's publication filters on it: PostgreSQL itself refuses the change.
      await assert.rejects(sql(db, retype), /cannot alter type of a column used by a publication/);
      return;
    }
    await sql(db, `${retype}; INSERT INTO retyped VALUES (2, 5)`);
    const closed = await client.closedWithin();
    assert.equal(closed.code, CloseCode.DefinitionBroken, closed.reason);
    assert.match(closed.reason, /retyped/);
  });
});
