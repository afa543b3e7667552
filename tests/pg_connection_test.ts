import assert from "node:assert/strict";
import { PgConnection } from "../src/postgres/pg_connection.ts";
import { connect, createPool } from "../src/postgres/database.ts";
import { sql, startPostgres, waitForSql } from "./support/harness.ts";
import { deadline, poll } from "./support/deadline.ts";

Deno.test("a connection queries, reports errors with their SQLSTATE, and copies out", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  using connection = await PgConnection.connect(db);

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
    using fresh = await PgConnection.connect(db);
    assert.deepEqual((await fresh.query("SELECT '\\xde'::bytea::text")).rows, [["\\xde"]]);
    await sql(db, "ALTER DATABASE postgres RESET bytea_output");
  });

  await t.step("an error carries its SQLSTATE, and the connection stays usable", async () => {
    const error = await connection.query("SELECT * FROM no_such_table").catch((e) => e);
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
    using replication = await PgConnection.connect(db, true);
    const { fields } = await replication.query("IDENTIFY_SYSTEM");
    assert.deepEqual(fields, ["systemid", "timeline", "xlogpos", "dbname"]);
  });
});

Deno.test("connections authenticate with scram-sha-256 and md5", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  // Password methods for three roles, ahead of initdb's trust lines.
  const hba = `${postgres.dataDir}/pg_hba.conf`;
  await Deno.writeTextFile(
    hba,
    [
      "host all scram_user 127.0.0.1/32 scram-sha-256",
      "host all md5_user 127.0.0.1/32 md5",
      await Deno.readTextFile(hba),
    ].join("\n"),
  );
  const password = "sécret pässword";
  await sql(
    db,
    `SET password_encryption = 'scram-sha-256';
     CREATE ROLE scram_user LOGIN PASSWORD '${password}';
     SET password_encryption = 'md5';
     CREATE ROLE md5_user LOGIN PASSWORD '${password}';
     SELECT pg_reload_conf();`,
  );
  for (const user of ["scram_user", "md5_user"]) {
    await t.step(user, async () => {
      using connection = await PgConnection.connect({ ...db, user, password });
      assert.deepEqual((await connection.query("SELECT current_user")).rows, [[user]]);
      const refused = await PgConnection.connect({ ...db, user, password: "wrong" }).then(
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

/**
 * A man in the middle between a client and PostgreSQL: passes everything,
 * but hands each authentication message the server sends to `tamper` first
 * (`kind` is its Authentication request code), which may change it or drop it.
 */
function manInTheMiddle(
  upstream: { host: string; port: number },
  tamper: (kind: number, message: Uint8Array) => Uint8Array | undefined,
): { port: number } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const links = new Set<Deno.Conn>();
  const relayed: Promise<void>[] = [];
  const accepting = (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({ hostname: upstream.host, port: upstream.port });
      links.add(client);
      links.add(server);
      const pipe = async (from: Deno.Conn, to: Deno.Conn, edit: boolean) => {
        let pending = new Uint8Array(0);
        const buffer = new Uint8Array(64 << 10);
        try {
          for (;;) {
            const n = await from.read(buffer);
            if (n === null) break;
            if (!edit) {
              await to.write(buffer.slice(0, n));
              continue;
            }
            const joined = new Uint8Array(pending.length + n);
            joined.set(pending);
            joined.set(buffer.subarray(0, n), pending.length);
            let at = 0;
            while (joined.length - at >= 5) {
              const length = new DataView(joined.buffer).getInt32(at + 1);
              if (joined.length - at < length + 1) break;
              let message: Uint8Array | undefined = joined.slice(at, at + length + 1);
              if (message[0] === 0x52) {
                message = tamper(new DataView(message.buffer).getInt32(5), message);
              }
              if (message !== undefined) await to.write(message);
              at += length + 1;
            }
            pending = joined.slice(at);
          }
        } catch { /* either side closed */ }
        for (const conn of [from, to]) {
          try {
            conn.close();
          } catch { /* closed */ }
        }
      };
      relayed.push(pipe(client, server, false), pipe(server, client, true));
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const conn of links) {
        try {
          conn.close();
        } catch { /* closed */ }
      }
      await accepting;
      await Promise.all(relayed);
    },
  };
}

Deno.test("connections refuse a server that never proves it knows the password, and cleartext passwords without TLS", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const hba = `${postgres.dataDir}/pg_hba.conf`;
  await Deno.writeTextFile(
    hba,
    [
      "host all scram_user 127.0.0.1/32 scram-sha-256",
      "host all plain_user 127.0.0.1/32 password",
      await Deno.readTextFile(hba),
    ].join("\n"),
  );
  const password = "a password nobody in the middle may learn";
  await sql(
    db,
    `SET password_encryption = 'scram-sha-256';
     CREATE ROLE scram_user LOGIN PASSWORD '${password}';
     CREATE ROLE plain_user LOGIN PASSWORD '${password}';
     SELECT pg_reload_conf();`,
  );
  /** The error connecting with `config` gives, the same for a dedicated connection and the pool's. */
  const refusal = async (config: typeof db) => {
    const dedicated = await PgConnection.connect(config).then((c) => {
      c.close();
      throw new Error("the connection was accepted");
    }, (error: Error) => error);
    const client = await connect(config).then(async (c) => {
      await c.end();
      throw new Error("the pool's kind of connection was accepted");
    }, (error: Error) => error);
    assert.equal(client.message, dedicated.message);
    return dedicated;
  };

  await t.step("SCRAM's final message dropped: AuthenticationOk alone is not enough", async () => {
    await using mitm = manInTheMiddle(db, (kind, m) => kind === 12 ? undefined : m);
    const error = await refusal({
      ...db,
      port: mitm.port,
      sslmode: "disable",
      user: "scram_user",
      password,
    });
    assert.match(error.message, /never proved it knows the password/);
  });

  await t.step("SCRAM's server signature altered: refused", async () => {
    await using mitm = manInTheMiddle(db, (kind, m) => {
      if (kind !== 12) return m;
      const text = new TextDecoder().decode(m.subarray(9)).replace(/v=./, "v=A");
      const body = new TextEncoder().encode(text);
      const out = new Uint8Array(9 + body.length);
      out.set(m.subarray(0, 9));
      out.set(body, 9);
      new DataView(out.buffer).setInt32(1, out.length - 1);
      return out;
    });
    const error = await refusal({
      ...db,
      port: mitm.port,
      sslmode: "disable",
      user: "scram_user",
      password,
    });
    assert.match(error.message, /signature does not match/);
  });

  await t.step("a cleartext password request on a connection without TLS: not sent", async () => {
    const error = await refusal({ ...db, user: "plain_user", password });
    assert.match(error.message, /in cleartext on a connection that is not encrypted/);
  });

  await t.step("untouched, SCRAM through the same relay still works", async () => {
    await using mitm = manInTheMiddle(db, (_kind, m) => m);
    using connection = await PgConnection.connect({
      ...db,
      port: mitm.port,
      sslmode: "disable", // the relay passes no SSLRequest answer
      user: "scram_user",
      password,
    });
    assert.deepEqual((await connection.query("SELECT current_user")).rows, [["scram_user"]]);
  });
});

Deno.test("a query in progress is cancelled by a CancelRequest", async () => {
  await using postgres = await startPostgres();
  using connection = await PgConnection.connect(postgres.database);
  const sleeping = connection.query("SELECT pg_sleep(600)").then(() => undefined, (e) => e);
  await waitForSql(
    postgres.database,
    "SELECT count(*) = 1 AS ok FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'",
  );
  await connection.cancel();
  const error = await deadline(sleeping, "the cancelled query to end");
  assert.equal(error?.code, "57014", String(error)); // query_canceled
  assert.deepEqual((await connection.query("SELECT 4")).rows, [["4"]], "the connection goes on");
});

Deno.test("a pooled connection that dies while checked out fails its next query, and the process keeps running", async () => {
  await using postgres = await startPostgres();
  const pool = createPool(postgres.database);
  try {
    const client = await pool.connect();
    try {
      const { rows: [{ pid }] } = await client.query<{ pid: number }>(
        "SELECT pg_backend_pid() AS pid",
      );
      // Its backend ends between two of its queries (a failover, a restart, an operator's kill):
      // PostgreSQL says so on the idle connection, which must not be an uncaught error.
      await sql(postgres.database, "SELECT pg_terminate_backend($1)", [pid]);
      const failed = await poll(
        () => client.query("SELECT 1").then(() => undefined, (error: Error) => error),
        "the next query on the dead connection to fail",
      );
      assert.ok(failed instanceof Error);
    } finally {
      client.release(true);
    }
    const { rows: [{ one }] } = await pool.query<{ one: number }>("SELECT 1 AS one");
    assert.equal(one, 1, "the pool serves again on a new connection");
  } finally {
    await pool.end();
  }
});
