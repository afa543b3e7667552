import assert from "node:assert/strict";
import type { Change } from "../src/protocol.ts";
import {
  createStream,
  deleteAt,
  init,
  postJson,
  ServerProcess,
  sql,
  StreamClient,
} from "./support/harness.ts";
import { APP_PASSWORD, startTlsPostgres, type TlsPostgres } from "./support/tls.ts";

/**
 * Init, a snapshot page, an export, a v1 and a v2 stream, each with a change:
 * every kind of connection; then, while they are open, what PostgreSQL sees
 * of the server's connections.
 */
async function exercise(pg: TlsPostgres, base: URL, label: string, user: string) {
  const slotName = await init(base);
  const page = await postJson(new URL("/v1/snapshot/data", base), { slotName, table: "items" });
  assert.equal(page.status, 200, page.text);
  assert.deepEqual(JSON.parse(page.text).map((r: { id: number }) => r.id).slice(0, 2), [1, 2]);
  const exported = await postJson(new URL("/v1/snapshot/export", base), {
    slotName,
    table: "items",
  });
  assert.equal(exported.status, 200, exported.text);
  assert.ok(exported.text.split("\n").filter(Boolean).length >= 2, exported.text);
  await using v1 = await StreamClient.open(base, slotName);
  const name = `tls-${label}`;
  await createStream(base, { name, tables: ["items"] });
  await using v2 = await StreamClient.changes(base, name);
  const id = 1000 + Math.floor(Math.random() * 1e6);
  await sql(pg.admin, `INSERT INTO items VALUES (${id}, '${label}')`);
  for (const client of [v1, v2]) {
    const frame = await client.nextV2();
    const inserted = frame.change.find((c: Change) => c.kind === "insert");
    assert.ok(inserted, `${label}: an insert frame on ${client.url}`);
    client.ack(frame.nextlsn);
  }
  const seen = await serverConnections(pg, user);
  assert.equal(await deleteAt(base, `/v2/streams/${name}`), 204);
  return seen;
}

/** The server's connections as PostgreSQL sees them: how many, how many without TLS, walsenders. */
async function serverConnections(pg: TlsPostgres, user: string) {
  const [row] = await sql<{ total: number; plain: number; walsenders: number }>(
    pg.admin,
    `SELECT count(*)::int AS total, count(*) FILTER (WHERE NOT s.ssl)::int AS plain,
            count(*) FILTER (WHERE a.backend_type = 'walsender')::int AS walsenders
       FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
      WHERE a.usename = $1`,
    [user],
  );
  return row;
}

Deno.test("the server connects to a TLS-only PostgreSQL as libpq users configure it", async (t) => {
  await using pg = await startTlsPostgres();
  const { ca, otherCa, clientCert, clientKey } = pg.certificates;
  const url = (host: string, user: string, query: string) =>
    `postgresql://${user}@${host}:${pg.port}/postgres?${query}`;
  const app = `app:${encodeURIComponent(APP_PASSWORD)}`;
  const passfile = `${pg.certificates.dir}/pgpass`;
  await Deno.writeTextFile(passfile, `# the server reads this itself\n*:*:*:app:${APP_PASSWORD}\n`);
  await Deno.chmod(passfile, 0o600);

  const cases: { label: string; env: Record<string, string>; user: string; tls: boolean }[] = [
    {
      label: "verify-full-url",
      env: { DATABASE_URL: url("localhost", app, `sslmode=verify-full&sslrootcert=${ca}`) },
      user: "app",
      tls: true,
    },
    {
      label: "verify-full-env",
      env: {
        PGHOST: "localhost",
        PGUSER: "app",
        PGPASSWORD: APP_PASSWORD,
        PGSSLMODE: "verify-full",
        PGSSLROOTCERT: ca,
      },
      user: "app",
      tls: true,
    },
    {
      // The certificate names localhost only: the chain is checked, the name is not.
      label: "verify-ca",
      env: { DATABASE_URL: url("127.0.0.1", app, `sslmode=verify-ca&sslrootcert=${ca}`) },
      user: "app",
      tls: true,
    },
    {
      label: "require",
      env: { DATABASE_URL: url("localhost", app, "sslmode=require") },
      user: "app",
      tls: true,
    },
    {
      // libpq's default: TLS when the server has it, unverified.
      label: "prefer",
      env: { DATABASE_URL: url("localhost", app, "connect_timeout=10") },
      user: "app",
      tls: true,
    },
    {
      // Plain first; the server refuses it (hostnossl … reject), so the same start-up over TLS.
      label: "allow",
      env: { DATABASE_URL: url("localhost", app, "sslmode=allow") },
      user: "app",
      tls: true,
    },
    {
      label: "client-cert",
      env: {
        DATABASE_URL: url(
          "localhost",
          "certuser",
          `sslmode=verify-full&sslrootcert=${ca}&sslcert=${clientCert}&sslkey=${clientKey}`,
        ),
      },
      user: "certuser",
      tls: true,
    },
    {
      label: "socket-pgpass",
      env: { PGHOST: pg.socketDir, PGUSER: "app", PGPASSFILE: passfile },
      user: "app",
      tls: false,
    },
  ];
  for (const { label, env, user, tls } of cases) {
    await t.step(`${label}: init, snapshot, export, v1 and v2 streams`, async () => {
      await using server = await ServerProcess.spawn(pg.admin, env);
      const seen = await exercise(pg, server.url, label, user);
      assert.ok(seen.total >= 3, `${label}: ${JSON.stringify(seen)}`);
      assert.ok(seen.walsenders >= 1, `${label}: no walsender: ${JSON.stringify(seen)}`);
      if (tls) assert.equal(seen.plain, 0, `${label}: connections without TLS`);
      await server.kill("SIGTERM");
      const output = await server.output;
      if (label === "require") {
        assert.match(output, /sslmode=require encrypts the connection but does not check/);
      } else {
        assert.doesNotMatch(output, /does not check the server's certificate/);
      }
    });
  }

  const refusals: { label: string; env: Record<string, string>; message: RegExp }[] = [
    {
      label: "a CA that did not sign the server's certificate",
      env: { DATABASE_URL: url("localhost", app, `sslmode=verify-full&sslrootcert=${otherCa}`) },
      message: new RegExp(
        `certificate was refused under sslmode=verify-full: it is not signed by the CA certificate in sslrootcert=${otherCa}`,
      ),
    },
    {
      label: "verify-full to a name the certificate does not have",
      env: { DATABASE_URL: url("127.0.0.1", app, `sslmode=verify-full&sslrootcert=${ca}`) },
      message:
        /certificate was refused under sslmode=verify-full: it is not issued for "127\.0\.0\.1"/,
    },
    {
      label: "no TLS where the server requires it",
      env: { DATABASE_URL: url("localhost", app, "sslmode=disable") },
      message: /no encryption|rejects connection/,
    },
  ];
  for (const { label, env, message } of refusals) {
    await t.step(`refused: ${label}, with a message that says why`, async () => {
      const error = await ServerProcess.spawn(pg.admin, env).then(
        async (server) => {
          await server.kill();
          throw new Error("the server started");
        },
        (error: Error) => error,
      );
      assert.match(error.message, message);
      assert.doesNotMatch(error.message, new RegExp(APP_PASSWORD), "no password in the output");
    });
  }
});
