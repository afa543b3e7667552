import assert from "node:assert/strict";
import { connectStream } from "../client/mod.ts";
import type { DatabaseConfig } from "../src/config.ts";
import { CloseCode } from "../src/protocol.ts";
import type { RunningServer } from "../src/server.ts";
import { deadline, poll } from "./support/deadline.ts";
import {
  captureLog,
  createStream,
  init,
  postJson,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  streamState,
  waitForSql,
} from "./support/harness.ts";

const GUARD = { walGuardIntervalMs: 200, slotBusyTimeoutSeconds: 5 };

/** Writes about `kib` KiB of WAL in one transaction. */
function writeWal(db: DatabaseConfig, kib: number): Promise<unknown> {
  return sql(
    db,
    "INSERT INTO pad(v) SELECT repeat(md5(g::text), 32) FROM generate_series(1, $1) g",
    [
      kib,
    ],
  );
}

/** Runs one WAL guard check to its end (waiting out one the timer is running). */
async function guardChecked(api: RunningServer): Promise<void> {
  await poll(() => api.app.guard.check(), "a WAL guard check to run", { intervalMs: 50 });
}

async function slotExists(db: DatabaseConfig, slot: string): Promise<boolean> {
  return (await sql(db, "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", [slot])).length >
    0;
}

Deno.test("WAL guard: lag and idle limits warn, then invalidate; reset brings a stream back", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE pad(id bigserial primary key, v text)");
  using captured = captureLog();
  await using api = await startApi(db, GUARD);

  await t.step(
    "a stream that falls behind is warned at half its limit, then invalidated at it",
    async () => {
      const created = await createStream(api.url, {
        name: "capped",
        tables: ["pad"],
        limits: { maxLagBytes: 4 << 20, maxIdleSeconds: 0 },
      });
      assert.deepEqual(created.limits, { maxLagBytes: 4 << 20, maxIdleSeconds: 0 });
      const seen: string[] = [];
      // At most 16 MiB, four times the limit: the assertion below then says what was seen.
      for (let i = 0; i < 64 && seen.at(-1) !== "invalidated"; i++) {
        await writeWal(db, 256);
        const health = (await streamState(api.url, "capped")).health;
        if (seen.at(-1) !== health) seen.push(health);
        if (health === "warning") {
          await poll(
            () =>
              captured.events().some((e) =>
                e.event === "stream.limit_warning" && e.stream === "capped"
              ),
            "the guard's warning in the log",
          );
        }
        if (health !== "ok" && health !== "warning") break;
        // Past the warning, keep writing and checking until the guard acted.
        if (seen.includes("warning")) await guardChecked(api);
      }
      assert.deepEqual(seen, ["ok", "warning", "invalidated"]);
      const after = await streamState(api.url, "capped");
      assert.match(after.invalidated!.reason, /of WAL behind, over its limit of 4\.0 MiB/);
      assert.equal(after.retainedBytes, null);
      assert.equal(await slotExists(db, created.slotName), false, "the slot still holds WAL");
      const invalidated = captured.events().filter((e) => e.event === "stream.invalidated");
      assert.equal(invalidated.length, 1);
      const metrics = await (await fetch(new URL("/metrics", api.url))).text();
      assert.match(metrics, /pgdeltastream_stream_invalidated\{stream="capped"\} 1/);
      assert.match(metrics, /pgdeltastream_stream_invalidations_total\{stream="capped"\} 1/);
    },
  );

  await t.step(
    "a consumer of an invalidated stream is told 4410, and changes were lost",
    async () => {
      await using client = await StreamClient.changes(api.url, "capped");
      const closed = await client.closedWithin();
      assert.equal(closed.code, CloseCode.StreamInvalidated);
      assert.match(
        closed.reason,
        /invalidated: changes lost; POST \.\.\.\/reset for a new snapshot/,
      );
      const stream = connectStream({ url: api.url, stream: "capped" });
      const error = await deadline(
        stream.next().then(() => undefined, (e) => e),
        "the client's error",
      );
      assert.equal(error.code, CloseCode.StreamInvalidated);
    },
  );

  await t.step(
    "reset gives the same definition a new slot, a fresh snapshot and a working stream",
    async () => {
      const reset = await postJson(new URL("/v2/streams/capped/reset", api.url), {});
      assert.equal(reset.status, 201, reset.text);
      const body = JSON.parse(reset.text);
      assert.match(body.slotName, /^pgds_capped_/);
      assert.ok(body.snapshot.expiresAt);
      const fresh = await streamState(api.url, "capped");
      assert.equal(fresh.health, "ok");
      assert.equal(fresh.invalidated, undefined);
      const page = await postJson(new URL("/v2/streams/capped/snapshot", api.url), {
        table: "pad",
        limit: 1,
        order_by: { column: "id", order: "desc" },
      });
      assert.equal(page.status, 200);
      const [{ id: lastId }] = JSON.parse(page.text);
      await using client = await StreamClient.changes(api.url, "capped");
      await sql(db, "INSERT INTO pad(v) VALUES ('after reset')");
      const frame = await client.nextV2();
      const insert = frame.change.find((c) => c.kind === "insert") as { columnvalues: unknown[] };
      assert.deepEqual(insert.columnvalues, [lastId + 1, "after reset"]);
    },
  );

  await t.step(
    "a slow consumer that keeps acknowledging is never invalidated below its limit",
    async () => {
      await createStream(api.url, {
        name: "steady",
        tables: ["pad"],
        limits: { maxLagBytes: 3 << 20, maxIdleSeconds: 0 },
      });
      const stream = connectStream({ url: api.url, stream: "steady" });
      let transactions = 0;
      const reading = stream.run(async () => {
        transactions++;
        await new Promise((resolve) => setTimeout(resolve, 20)); // slow, but progressing
      });
      for (let i = 0; i < 40; i++) {
        await writeWal(db, 256); // 10 MiB in all, over three times the limit
        await poll(() => transactions > i, "the consumer to take the transaction");
      }
      await stream.close();
      await reading;
      await guardChecked(api); // a check after all of it
      const steady = await streamState(api.url, "steady");
      assert.notEqual(steady.health, "invalidated", steady.invalidated?.reason);
    },
  );

  await t.step("a stream without a consumer past maxIdleSeconds is invalidated", async () => {
    await createStream(api.url, {
      name: "idle",
      tables: ["pad"],
      limits: { maxLagBytes: 0, maxIdleSeconds: 1 },
    });
    await poll(
      async () => (await streamState(api.url, "idle")).health === "invalidated",
      "the idle limit",
    );
    assert.match(
      (await streamState(api.url, "idle")).invalidated!.reason,
      /no consumer for \d+ s, over its limit of 1 s/,
    );
  });

  await t.step("v1 slots get the server's limits, and their consumers 4410", async () => {
    await using v1 = await startApi(db, {
      ...GUARD,
      streamLimits: { maxLagBytes: 1 << 20, maxIdleSeconds: 0 },
    });
    const slot = await init(v1.url);
    await writeWal(db, 2048);
    await waitForSql(
      db,
      "SELECT NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1) AS ok",
      [slot],
    );
    await using client = await StreamClient.open(v1.url, slot);
    const closed = await client.closedWithin();
    assert.equal(closed.code, CloseCode.StreamInvalidated);
    assert.match(closed.reason, /call \/v1\/init for a new snapshot/);
  });
});

Deno.test("WAL guard: the idle clock lives in the database and survives a restart", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE pad(id bigserial primary key, v text)");
  {
    await using api = await startApi(db, GUARD);
    await createStream(api.url, { name: "clock", tables: ["pad"], limits: { maxIdleSeconds: 3 } });
    await using _client = await StreamClient.changes(api.url, "clock");
    await waitActivity(db);
  }
  // Half the limit passes with no server at all.
  await waitForSql(
    db,
    "SELECT now() - last_activity > interval '1.5 s' AS ok FROM pgdeltastream.streams",
  );
  const [{ started }] = await sql<{ started: Date }>(db, "SELECT now() AS started");
  await using api = await startApi(db, GUARD);
  await poll(
    async () => (await streamState(api.url, "clock")).health === "invalidated",
    "the idle limit",
  );
  const [{ since_start, since_activity }] = await sql<
    { since_start: number; since_activity: number }
  >(
    db,
    `SELECT extract(epoch FROM invalidated_at - $1::timestamptz)::float8 AS since_start,
            extract(epoch FROM invalidated_at - last_activity)::float8 AS since_activity
       FROM pgdeltastream.streams`,
    [started],
  );
  assert.ok(since_activity >= 3, `invalidated ${since_activity} s after the last activity`);
  // Had the restart reset the clock, the stream would have lasted 3 s past it.
  assert.ok(since_start < 3, `invalidated ${since_start} s after the restart`);
});

/** Waits until the guard has recorded a connected consumer's activity (last_activity moved). */
async function waitActivity(db: DatabaseConfig): Promise<void> {
  const [{ created }] = await sql<{ created: Date }>(
    db,
    "SELECT last_activity AS created FROM pgdeltastream.streams",
  );
  // The guard recorded the consumer's activity.
  await waitForSql(db, "SELECT last_activity > $1 AS ok FROM pgdeltastream.streams", [created]);
}

Deno.test("WAL guard: a slot PostgreSQL invalidated (max_slot_wal_keep_size) takes the same path, once", async () => {
  await using postgres = await startPostgres({ settings: { max_slot_wal_keep_size: "1MB" } });
  const db = postgres.database;
  await sql(db, "CREATE TABLE pad(id bigserial primary key, v text)");
  using captured = captureLog();
  await using api = await startApi(db, GUARD);
  const created = await createStream(api.url, {
    name: "kept",
    tables: ["pad"],
    limits: { maxLagBytes: 0, maxIdleSeconds: 0 },
  });
  await poll(async () => {
    await writeWal(db, 8192); // past a 16 MB segment each time
    await sql(db, "CHECKPOINT");
    const [row] = await sql<{ wal_status: string }>(
      db,
      "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
      [created.slotName],
    );
    return row === undefined || row.wal_status === "lost";
  }, "PostgreSQL to invalidate the slot");
  await poll(
    async () => (await streamState(api.url, "kept")).health === "invalidated",
    "the guard to see it",
  );
  const kept = await streamState(api.url, "kept");
  assert.match(
    kept.invalidated!.reason,
    /PostgreSQL invalidated its slot .*max_slot_wal_keep_size \(1MB\)/,
  );
  assert.equal(await slotExists(db, created.slotName), false);
  await using client = await StreamClient.changes(api.url, "kept");
  assert.equal((await client.closedWithin()).code, CloseCode.StreamInvalidated);
  // A few more checks pass: the stream is reported once, and nothing fails in a loop.
  for (let i = 0; i < 3; i++) await guardChecked(api);
  const events = captured.events();
  assert.equal(events.filter((e) => e.event === "stream.invalidated").length, 1);
  assert.deepEqual(
    events.filter((e) => e.level === "error" && e.event !== "stream.invalidated").map((e) => e.msg),
    [],
  );
});
