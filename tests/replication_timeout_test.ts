import assert from "node:assert/strict";
import { CloseCode } from "../src/protocol.ts";
import {
  createStream,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  waitForSql,
} from "./support/harness.ts";

/**
 * A TCP relay to PostgreSQL that can go silent on replication connections:
 * their bytes stop in both directions while both sockets stay open, as on a
 * link whose other end vanished (a NAT timeout, a failed switch). Other
 * connections pass.
 */
function silentLink(upstream: { host: string; port: number }) {
  interface Link {
    client: Deno.Conn;
    server: Deno.Conn;
    replication: boolean;
    silent: boolean;
  }
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const links = new Set<Link>();
  const tasks: Promise<void>[] = [];
  const close = (link: Link) => {
    for (const conn of [link.client, link.server]) {
      try {
        conn.close();
      } catch { /* closed */ }
    }
  };
  const pipe = async (from: Deno.Conn, to: Deno.Conn, link: Link) => {
    const buffer = new Uint8Array(64 << 10);
    try {
      for (;;) {
        const n = await from.read(buffer);
        if (n === null) break;
        // The start-up message names a walsender connection: replication=database.
        if (new TextDecoder().decode(buffer.subarray(0, n)).includes("replication\0database")) {
          link.replication = true;
        }
        if (link.silent) continue; // swallowed: nothing arrives, nothing closes
        await to.write(buffer.slice(0, n));
      }
    } catch { /* closed */ }
    close(link);
    links.delete(link);
  };
  const accepting = (async () => {
    for await (const client of listener) {
      const server = await Deno.connect({ hostname: upstream.host, port: upstream.port });
      const link = { client, server, replication: false, silent: false };
      links.add(link);
      tasks.push(pipe(client, server, link), pipe(server, client, link));
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    /** The replication links open now go silent (those opened later pass); returns how many. */
    silence(): number {
      let count = 0;
      for (const link of links) {
        if (link.replication) {
          link.silent = true;
          count++;
        }
      }
      return count;
    },
    /** Closes the silent links, as PostgreSQL's side would in the end. */
    closeSilent(): void {
      for (const link of links) if (link.silent) close(link);
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const link of links) close(link);
      await accepting;
      await Promise.all(tasks);
    },
  };
}

Deno.test("a replication link that goes silent is noticed within its timeout, and the stream resumes", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE t(id int primary key)");
  await using link = silentLink(db);
  await using api = await startApi(
    { ...db, port: link.port, sslmode: "disable" },
    { replicationTimeoutMs: 2000 },
  );
  await createStream(api.url, { name: "quiet", tables: ["t"] });
  await using first = await StreamClient.changes(api.url, "quiet");
  await sql(db, "INSERT INTO t VALUES (1)");
  const frame = await first.nextV2();
  first.ack(frame.nextlsn);
  await waitForSql(
    db,
    "SELECT bool_and(confirmed_flush_lsn >= $1::pg_lsn) AS ok FROM pg_replication_slots",
    [frame.nextlsn],
  );
  // A quiet but healthy link outlives the timeout: at half of it the server asks PostgreSQL to
  // answer (a status update asking for a reply), and it does, long before wal_sender_timeout.
  await new Promise((resolve) => setTimeout(resolve, 3000));
  assert.equal(first.socket.readyState, WebSocket.OPEN, "a healthy idle link was given up");
  // The walsender's link goes silent: no byte either way, no close either.
  const started = performance.now();
  assert.equal(link.silence(), 1, "one replication link");
  const closed = await first.closedWithin();
  const noticedMs = performance.now() - started;
  console.log(`a silent replication link was given up after ${(noticedMs / 1000).toFixed(1)} s`);
  assert.equal(closed.code, CloseCode.TryAgainLater, closed.reason);
  // The old walsender holds the slot until PostgreSQL gives up on its side (wal_sender_timeout):
  // that side is closed here rather than waited for.
  link.closeSilent();
  await sql(db, "INSERT INTO t VALUES (2)");
  await using again = await StreamClient.changes(api.url, "quiet");
  const resumed = await again.nextV2();
  assert.deepEqual(
    resumed.change.filter((c) => c.kind === "insert").map((
      c,
    ) => ("columnvalues" in c ? c.columnvalues : [])),
    [[2]],
    "resumed after the last ack",
  );
});
