import assert from "node:assert/strict";
import {
  createStream,
  init,
  postJson,
  ServerProcess,
  sql,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";

Deno.test("a role that is not superuser runs the server once a superuser ran deno task setup-sql", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE ROLE cdc LOGIN REPLICATION");
  const cdc = { ...db, user: "cdc" };
  const refused = await ServerProcess.spawn(cdc).then(
    async (server) => {
      await server.kill();
      throw new Error("the server started without its schema");
    },
    (error: Error) => error.message,
  );
  assert.match(refused, /deno task setup-sql pgdeltastream <role>/);
  const printed = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      new URL("../src/postgres/setup_sql.ts", import.meta.url).pathname,
      "pgdeltastream",
      "cdc",
    ],
  }).output();
  assert.ok(printed.success);
  await sql(db, new TextDecoder().decode(printed.stdout));
  await sql(db, "CREATE TABLE t(id int primary key); GRANT SELECT ON t TO cdc");
  await using server = await ServerProcess.spawn(cdc);
  const slotName = await init(server.url);
  await using client = await StreamClient.open(server.url, slotName);
  await sql(db, "INSERT INTO t VALUES (1)");
  assert.deepEqual((await client.next()).change[0].columnvalues, [1]);
  const page = await postJson(new URL("/v1/snapshot/data", server.url), { slotName, table: "t" });
  assert.equal(page.status, 200, page.text);

  // Not owning t, it may not publish it with a row filter: the server filters alone.
  await createStream(server.url, {
    name: "big",
    tables: [{ table: "t", where: [["id", ">", 5]] }],
  });
  await using big = await StreamClient.changes(server.url, "big");
  await sql(db, "INSERT INTO t VALUES (2); INSERT INTO t VALUES (7)");
  const frame = await big.nextV2();
  const inserts = frame.change.filter((c) => c.kind === "insert");
  assert.deepEqual(inserts.map((c) => "columnvalues" in c && c.columnvalues), [[7]]);
  await server.kill("SIGTERM");
  assert.match(await server.output, /filters in the server only: the server's role may not create/);
});

Deno.test("with no replication slot free the server starts, warns, and init answers 503", async () => {
  await using postgres = await startPostgres({ settings: { max_replication_slots: "1" } });
  const db = postgres.database;
  await sql(db, "SELECT pg_create_logical_replication_slot('another_tool', 'pgoutput')");
  await using server = await ServerProcess.spawn(db);
  const response = await fetch(new URL("/v1/init", server.url));
  assert.equal(response.status, 503);
  assert.match((await response.json()).error, /all replication slots are in use/);
  await server.kill("SIGTERM");
  assert.match(await server.output, /warning: No free replication slots.*init answers 503/);
});

/** Spawns the server and expects it to refuse to start; returns what it printed. */
async function refusal(
  db: Parameters<typeof ServerProcess.spawn>[0],
  env: Record<string, string> = {},
) {
  const error = await ServerProcess.spawn(db, env).then(
    async (server) => {
      await server.kill();
      throw new Error("the server started");
    },
    (error: Error) => error,
  );
  assert.match(error.message, /exited with code [12] before it was ready/);
  return error.message;
}

Deno.test("start-up checks stop the server with a message that says how to fix the database", async (t) => {
  await t.step("unreachable database", async () => {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (listener.addr as Deno.NetAddr).port;
    listener.close(); // nothing listens there now
    const message = await refusal({
      host: "127.0.0.1",
      port,
      user: "postgres",
      database: "postgres",
      application_name: "t",
    });
    assert.match(
      message,
      /Cannot connect to PostgreSQL at 127\.0\.0\.1:\d+\/postgres.*PGHOST and PGPORT/s,
    );
  });

  await t.step("bad configuration", async () => {
    const message = await refusal({
      host: "127.0.0.1",
      port: 1,
      user: "postgres",
      database: "postgres",
      application_name: "t",
    }, {
      SNAPSHOT_TTL_SECONDS: "soon",
    });
    assert.match(message, /SNAPSHOT_TTL_SECONDS="soon" is invalid/);
  });

  {
    await using postgres = await startPostgres({ settings: { wal_level: "replica" } });
    await t.step("wal_level is not logical", async () => {
      const message = await refusal(postgres.database);
      assert.match(message, /wal_level is "replica".*wal_level = logical/s);
    });
  }

  {
    await using postgres = await startPostgres();
    await sql(postgres.database, "CREATE ROLE app LOGIN");
    await t.step("role without REPLICATION", async () => {
      const message = await refusal({ ...postgres.database, user: "app" });
      assert.match(
        message,
        /Role "app" lacks the REPLICATION privilege: run ALTER ROLE "app" WITH REPLICATION/,
      );
    });
    await t.step("a database that does not exist", async () => {
      const message = await refusal({ ...postgres.database, database: "nope" });
      assert.match(message, /Database missing.*DBNAME/s);
    });
  }
});
