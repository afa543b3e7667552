import assert from "node:assert/strict";
import { sql, startApi, startPostgres } from "./support/harness.ts";
import { streamReference } from "./support/reference.ts";

/** Debian's PostgreSQL 15 with wal2json (`apt-get install postgresql-15-wal2json`; .ci/run does it as root). */
const PG15_BIN = "/usr/lib/postgresql/15/bin";
const WAL2JSON = "/usr/lib/postgresql/15/lib/wal2json.so";
const haveWal2json = await Deno.stat(WAL2JSON).then(() => true, () => false);

Deno.test({
  name: "stream frames equal live wal2json output, nextlsn included, on one database",
  ignore: !haveWal2json,
  async fn() {
    await using postgres = await startPostgres({ binDir: PG15_BIN });
    const db = postgres.database;
    await using api = await startApi(db);
    const received = await streamReference(
      db,
      api.url,
      () => sql(db, "SELECT pg_create_logical_replication_slot('w2j', 'wal2json')"),
    );
    const wal2json = (await sql<{ data: string }>(
      db,
      `SELECT data FROM pg_logical_slot_get_changes('w2j', NULL, NULL, 'include-lsn', 'on', 'pretty-print', 'off')`,
    )).map((row) => row.data)
      // wal2json prints transactions with no row changes; pgoutput skips them, and so do we.
      .filter((frame) => !frame.endsWith('"change":[]}'));
    const expected = wal2json.slice(
      0,
      wal2json.findIndex((frame) => frame.includes('"table":"sentinel"')),
    );
    // Not streamed: the server's own bookkeeping (slot ownership rows), and logical decoding
    // messages (pg_logical_emit_message), which the recorded reference output does not carry either.
    const withoutBookkeeping = expected.filter((frame) =>
      !frame.includes('"schema":"pgdeltastream"') && !frame.includes('"kind":"message"')
    );
    assert.ok(withoutBookkeeping.length >= 15);
    assert.deepEqual(received, withoutBookkeeping);
  },
});
