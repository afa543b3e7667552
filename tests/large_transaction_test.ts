import assert from "node:assert/strict";
import { parseLsn } from "../src/lsn.ts";
import { init, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

const ROWS = 2000;

Deno.test("a large transaction arrives in partial frames that a v1 client can ack", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE big(id int primary key, pad text)");
  await using api = await startApi(db, { frameChunkBytes: 16 * 1024 });
  const slotName = await init(api.url);

  /** Reads frames up to and including the first non-partial one. */
  const readTransaction = async (client: StreamClient) => {
    const frames = [];
    for (;;) {
      const frame = await client.next() as Awaited<ReturnType<StreamClient["next"]>> & {
        partial?: boolean;
      };
      frames.push(frame);
      if (!frame.partial) return frames;
    }
  };

  await t.step(
    "chunks carry the previous nextlsn; the last carries the transaction's",
    async () => {
      await using client = await StreamClient.open(api.url, slotName);
      await sql(db, "INSERT INTO big VALUES (0, 'before')");
      const before = (await readTransaction(client))[0];
      client.ack(before.nextlsn);
      await sql(
        db,
        `INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, ${ROWS}) g`,
      );
      const frames = await readTransaction(client);
      assert.ok(frames.length > 5, `expected several chunks, got ${frames.length}`);
      for (const partial of frames.slice(0, -1)) {
        assert.equal(partial.nextlsn, before.nextlsn);
        client.ack(partial.nextlsn); // what a v1 client does: harmless, acknowledges nothing new
      }
      const last = frames.at(-1)!;
      assert.ok(parseLsn(last.nextlsn) > parseLsn(before.nextlsn));
      const ids = frames.flatMap((f) => f.change.map((c) => c.columnvalues![0]));
      assert.deepEqual(ids, Array.from({ length: ROWS }, (_, i) => i + 1));
    },
  );

  await t.step(
    "a reconnect before the last chunk's ack re-sends the whole transaction",
    async () => {
      {
        await using client = await StreamClient.open(api.url, slotName);
        const frames = await readTransaction(client);
        assert.equal(frames[0].change[0].columnvalues![0], 1);
      }
      await using again = await StreamClient.open(api.url, slotName);
      const frames = await readTransaction(again);
      assert.equal(frames.flatMap((f) => f.change).length, ROWS);
      again.ack(frames.at(-1)!.nextlsn);
    },
  );
});
