import assert from "node:assert/strict";
import { PostgresError, WireConnection } from "../src/postgres/wire_connection.ts";
import { sql, startPostgres } from "./support/harness.ts";

Deno.test("the wire client queries, reports errors with their SQLSTATE, and copies out", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  using connection = await WireConnection.connect(db);

  await t.step("rows come as text, NULL as null, from the last statement", async () => {
    const result = await connection.query(
      "SELECT 1; SELECT 'é ✓' AS t, NULL AS n, 12.50::numeric AS x",
    );
    assert.deepEqual(result.fields, ["t", "n", "x"]);
    assert.deepEqual(result.rows, [["é ✓", null, "12.50"]]);
    assert.equal(result.command, "SELECT 1");
  });

  await t.step("the pinned value settings apply", async () => {
    await sql(db, "ALTER DATABASE postgres SET bytea_output = 'escape'");
    using fresh = await WireConnection.connect(db);
    assert.deepEqual((await fresh.query("SELECT '\\xde'::bytea::text")).rows, [["\\xde"]]);
    await sql(db, "ALTER DATABASE postgres RESET bytea_output");
  });

  await t.step("an error carries its SQLSTATE, and the connection stays usable", async () => {
    const error = await connection.query("SELECT * FROM no_such_table").catch((e) => e);
    assert.ok(error instanceof PostgresError);
    assert.equal(error.code, "42P01");
    assert.match(error.message, /no_such_table/);
    assert.deepEqual((await connection.query("SELECT 2")).rows, [["2"]]);
  });

  await t.step("COPY out hands over every byte, and waits while the consumer does", async () => {
    let bytes = 0;
    let chunks = 0;
    const command = await connection.copyOut(
      "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g) TO STDOUT",
      (chunk) => {
        bytes += chunk.length;
        // Every 100th message the consumer is slow: nothing may be lost or reordered meanwhile.
        if (++chunks % 100 === 0) return new Promise((resolve) => setTimeout(resolve, 1));
      },
    );
    assert.equal(command, "COPY 20000");
    const [{ expected }] = await sql<{ expected: number }>(
      db,
      "SELECT sum(length(g::text) + 102)::int AS expected FROM generate_series(1, 20000) g",
    );
    assert.equal(bytes, expected);
    assert.equal(chunks, 20000, "one CopyData message a row");
    assert.deepEqual((await connection.query("SELECT 3")).rows, [["3"]]);
  });

  await t.step("a replication connection runs replication commands", async () => {
    using replication = await WireConnection.connect(db, true);
    const { fields } = await replication.query("IDENTIFY_SYSTEM");
    assert.deepEqual(fields, ["systemid", "timeline", "xlogpos", "dbname"]);
  });
});

Deno.test("the wire client authenticates with scram-sha-256, md5 and password", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  // Password methods for three roles, ahead of initdb's trust lines.
  const hba = `${postgres.dataDir}/pg_hba.conf`;
  await Deno.writeTextFile(
    hba,
    [
      "host all scram_user 127.0.0.1/32 scram-sha-256",
      "host all md5_user 127.0.0.1/32 md5",
      "host all plain_user 127.0.0.1/32 password",
      await Deno.readTextFile(hba),
    ].join("\n"),
  );
  const password = "sécret pässword";
  await sql(
    db,
    `SET password_encryption = 'scram-sha-256';
     CREATE ROLE scram_user LOGIN PASSWORD '${password}';
     CREATE ROLE plain_user LOGIN PASSWORD '${password}';
     SET password_encryption = 'md5';
     CREATE ROLE md5_user LOGIN PASSWORD '${password}';
     SELECT pg_reload_conf();`,
  );
  for (const user of ["scram_user", "md5_user", "plain_user"]) {
    await t.step(user, async () => {
      using connection = await WireConnection.connect({ ...db, user, password });
      assert.deepEqual((await connection.query("SELECT current_user")).rows, [[user]]);
      const refused = await WireConnection.connect({ ...db, user, password: "wrong" }).then(
        (c) => {
          c.close();
          throw new Error("a wrong password was accepted");
        },
        (error) => error,
      );
      assert.equal(refused.code, "28P01", String(refused));
    });
  }
});
