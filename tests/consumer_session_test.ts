/**
 * The rules of a consumer's socket (docs/protocol.md's acknowledgement table
 * and invariants 2 and 4), checked the same way against both sources a
 * consumer session can have: a slot's replication (a plain v2 stream) and
 * the stream's JetStream log (relay mode).
 */

import assert from "node:assert/strict";
import type { DatabaseConfig } from "../src/config.ts";
import { CloseCode, type RowChange } from "../src/protocol.ts";
import {
  createStream,
  ServerProcess,
  sql,
  startApi,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";
import { hasNats, NatsServer } from "./support/nats.ts";

const REQUIRE = Deno.env.get("REQUIRE_NATS") === "1";

/** Where a mode's consumer connects, over the same database and stream. */
interface Mode {
  base: URL;
  /** The consumer's websocket path (relay: with its consumer id). */
  path: string;
}

/** Inserted ids in a frame. */
function ids(text: string): number[] {
  return JSON.parse(text).change.filter((c: RowChange) => c.kind === "insert").map((
    c: RowChange,
  ) => c.columnvalues![0] as number);
}

async function invariants(t: Deno.TestContext, db: DatabaseConfig, mode: Mode): Promise<void> {
  const connect = () => StreamClient.connect(mode.base, mode.path);

  await t.step("an ack beyond what this socket was sent closes it with 4400", async () => {
    await using client = await connect();
    await sql(db, "INSERT INTO feed VALUES (1, 'a')");
    const frame = await client.next();
    assert.deepEqual(ids(JSON.stringify(frame)), [1]);
    client.ack("FF/0");
    const closed = await client.closedWithin();
    assert.equal(closed.code, CloseCode.InvalidAck);
    assert.match(closed.reason, /beyond the last nextlsn sent on this socket/);
  });

  await t.step("what was not acknowledged comes again; an ack of it holds", async () => {
    await using client = await connect();
    const again = await client.next();
    assert.deepEqual(ids(JSON.stringify(again)), [1], "row 1 again: it was never acknowledged");
    client.ack(again.nextlsn);
    await sql(db, "INSERT INTO feed VALUES (2, 'b')");
    const next = await client.next();
    assert.deepEqual(ids(JSON.stringify(next)), [2]);
    client.ack(next.nextlsn);
  });

  await t.step(
    "a large transaction comes in partial frames; acking one confirms nothing, the last one all",
    async () => {
      await using client = await connect();
      await sql(db, "INSERT INTO feed SELECT g, repeat('x', 200) FROM generate_series(10, 209) g");
      const got: number[] = [];
      let partials = 0;
      for (;;) {
        const frame = await client.next();
        got.push(...ids(JSON.stringify(frame)));
        client.ack(frame.nextlsn); // as a v1 client acks every frame: never a 4400
        if (!frame.partial) break;
        partials++;
      }
      assert.ok(partials > 0, "the transaction came in one frame");
      assert.deepEqual(got, Array.from({ length: 200 }, (_, i) => i + 10));
    },
  );

  await t.step("nothing acknowledged is sent again after a reconnect", async () => {
    await using client = await connect();
    await sql(db, "INSERT INTO feed VALUES (1000, 'c')");
    assert.deepEqual(ids(await client.nextText()), [1000]);
  });

  await t.step("a message that is not an ack closes 4400; a binary one 1003", async () => {
    for (
      const [message, code] of [["not json", CloseCode.InvalidAck], [
        new Uint8Array([1]),
        1003,
      ]] as const
    ) {
      await using client = await connect();
      client.socket.send(message);
      assert.equal((await client.closedWithin()).code, code);
    }
  });
}

const SETUP = "CREATE TABLE feed(id int primary key, pad text)";

Deno.test("consumer sessions of a slot keep the acknowledgement rules", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db, { frameChunkBytes: 4096 });
  await createStream(api.url, { name: "feed", tables: ["feed"] });
  await invariants(t, db, { base: api.url, path: "/v2/streams/feed/changes" });
});

Deno.test({
  name: "consumer sessions of a relay log keep the same acknowledgement rules",
  ignore: !hasNats && !REQUIRE,
  async fn(t) {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, SETUP);
    await using nats = await NatsServer.start();
    await using server = await ServerProcess.spawn(db, {
      NATS_URL: nats.url,
      RELAY_INSTANCE: "solo",
      FRAME_CHUNK_BYTES: "4096",
    });
    await createStream(server.url, { name: "feed", tables: ["feed"] });
    await invariants(t, db, { base: server.url, path: "/v2/streams/feed/changes?consumer=c1" });
  },
});
