import assert from "node:assert/strict";
import { parseLsn } from "../src/lsn.ts";
import { init, ServerProcess, sql, startPostgres, StreamClient } from "./support/harness.ts";

const ROWS = 600;
const KILLS = 3;

Deno.test("SIGKILL of the server mid-stream, then a restart, loses nothing", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE events(id int primary key)");
  let server = await ServerProcess.spawn(db);
  const slotName = await init(server.url);

  // A steady writer: one row per transaction, while the server is killed and restarted under it.
  const writer = (async () => {
    for (let id = 1; id <= ROWS; id++) await sql(db, "INSERT INTO events VALUES ($1)", [id]);
  })();

  const seen = new Map<number, number>(); // id → times received
  let duplicates = 0;
  // What PostgreSQL had confirmed when the server died: nothing at or below it may come again.
  let confirmedAtKill = 0n;
  for (let cycle = 0; cycle <= KILLS; cycle++) {
    const client = await StreamClient.open(server.url, slotName);
    // Read a stretch of frames (all of the rest in the last cycle), acknowledging each once processed.
    const until = cycle === KILLS ? ROWS : Math.min(ROWS, (cycle + 1) * (ROWS / (KILLS + 2)));
    while (!seen.has(until)) {
      const frame = await client.next();
      const id = frame.change[0].columnvalues![0] as number;
      assert.ok(
        parseLsn(frame.nextlsn) > confirmedAtKill,
        `row ${id} was re-sent after its ack was confirmed`,
      );
      if (seen.has(id)) duplicates++;
      seen.set(id, (seen.get(id) ?? 0) + 1);
      client.ack(frame.nextlsn);
    }
    if (cycle === KILLS) {
      await client[Symbol.asyncDispose]();
      break;
    }
    const status = await server.kill("SIGKILL");
    assert.equal(status.signal, "SIGKILL");
    await client.closed;
    const [slot] = await sql<{ lsn: string }>(
      db,
      "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1",
      [slotName],
    );
    confirmedAtKill = parseLsn(slot.lsn);
    server = await ServerProcess.spawn(db);
  }
  await writer;
  await server.kill("SIGTERM");

  for (let id = 1; id <= ROWS; id++) assert.ok(seen.has(id), `row ${id} was never received`);
  // Acks go to PostgreSQL as they arrive, so at most the frames in flight at each kill come again.
  assert.ok(duplicates <= KILLS * 16, `too many duplicates: ${duplicates}`);
});
