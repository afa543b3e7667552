import assert from "node:assert/strict";
import { init, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

/** Upgrade requests that `Deno.upgradeWebSocket` refuses: each must be answered before any database work. */
const BROKEN_HANDSHAKES: [string, number, Record<string, string>][] = [
  ["no Sec-WebSocket-Key", 400, { upgrade: "websocket", connection: "upgrade" }],
  ["no Connection: upgrade", 400, {
    upgrade: "websocket",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
  }],
  ["a Sec-WebSocket-Key that is not 16 bytes of base64", 400, {
    upgrade: "websocket",
    connection: "Upgrade",
    "sec-websocket-key": "short",
    "sec-websocket-version": "13",
  }],
  ["an unsupported Sec-WebSocket-Version", 426, {
    upgrade: "websocket",
    connection: "keep-alive, Upgrade",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "8",
  }],
];

Deno.test("a broken websocket handshake gets a 4xx and leaves no replication connection behind", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE t(id int primary key)");
  await using api = await startApi(db);
  const slotName = await init(api.url);

  for (const [label, status, headers] of BROKEN_HANDSHAKES) {
    await t.step(label, async () => {
      const response = await fetch(new URL(`/v1/lr/stream?slotName=${slotName}`, api.url), {
        headers,
      });
      assert.equal(response.status, status, label);
      assert.match((await response.json()).error, /websocket handshake/i);
      const [{ active }] = await sql<{ active: boolean }>(
        db,
        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
        [slotName],
      );
      assert.equal(active, false, "no walsender holds the slot after a refused handshake");
    });
  }

  await t.step("the slot streams normally afterwards (no 409 from a leaked session)", async () => {
    await using client = await StreamClient.open(api.url, slotName);
    await sql(db, "INSERT INTO t VALUES (1)");
    assert.deepEqual((await client.next()).change[0].columnvalues, [1]);
  });
});
