import assert from "node:assert/strict";
import { CloseCode } from "../src/protocol.ts";
import {
  init,
  ServerProcess,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  waitForSql,
} from "./support/harness.ts";
import { seededRandom, testSeed } from "./support/random.ts";
import {
  confirmedFlush,
  consume,
  createEvents,
  summarize,
  writeEvents,
} from "./support/workload.ts";

Deno.test("at least once through server crashes, database restarts and killed walsenders", async (t) => {
  await t.step(
    "SIGKILL of the server at 20 random moments, restarted each time: nothing lost",
    async () => {
      await using postgres = await startPostgres();
      const db = postgres.database;
      await createEvents(db);
      const rows = 2000;
      let server = await ServerProcess.spawn(db);
      try {
        const slotName = await init(server.url);
        // The kill moments are random, from a seed a failure prints: TEST_SEED=<seed> replays them.
        const seed = testSeed();
        const random = seededRandom(seed);
        console.log(`kill moments from TEST_SEED=${seed}`);
        const writer = writeEvents(db, rows, 10); // ~20 s of steady writes: room for 20 kills
        let kills = 0;
        let killedConnection = 0;
        let nextKill = 1 + Math.floor(random() * 40);
        try {
          const report = await consume({
            url: () => server.url,
            slotName,
            rows,
            confirmedFlush: () => confirmedFlush(db, slotName),
            onFrame: async (frames, connection) => {
              // Kill only a server this client is connected to, not while it drains what the last one sent.
              if (kills >= 20 || frames < nextKill || connection === killedConnection) return;
              kills++;
              killedConnection = connection;
              nextKill = frames + 1 + Math.floor(random() * 40);
              assert.equal((await server.kill("SIGKILL")).signal, "SIGKILL");
              server = await ServerProcess.spawn(db);
            },
          });
          await writer;
          assert.equal(kills, 20);
          summarize("20 x SIGKILL", rows, report);
          assert.equal(report.resentAfterConfirm, 0, "an acknowledged transaction was sent again");
        } catch (error) {
          throw new Error(`${(error as Error).message} (replay with TEST_SEED=${seed})`, {
            cause: error,
          });
        }
      } finally {
        await server.kill("SIGKILL");
      }
    },
  );

  await t.step(
    "PostgreSQL restarted mid-stream: the server keeps answering and streams resume",
    async () => {
      // The restart runs beside the consumer: PostgreSQL's shutdown waits until every logical
      // walsender's client has confirmed what it was sent, so the client must keep acking meanwhile.
      let restart: Promise<void> | undefined;
      const report = await inProcessScenario("PostgreSQL restart", ({ postgres, api }) => {
        restart = (async () => {
          await postgres.stop("fast");
          const down = await fetch(new URL("/healthz", api.url));
          assert.equal(down.status, 503);
          assert.deepEqual(await down.json(), { status: "unavailable" });
          const status = await fetch(new URL("/v2/status", api.url));
          assert.equal(status.status, 503);
          assert.equal((await status.json()).database.reachable, false);
          const refused = await fetch(new URL("/v1/init", api.url));
          assert.equal(refused.status, 503);
          assert.match((await refused.json()).error, /Database unavailable/);
          await postgres.startAgain();
        })();
      }, async ({ api }) => {
        await restart;
        const health = await fetch(new URL("/healthz", api.url));
        assert.equal(health.status, 200);
        await health.body?.cancel();
      });
      assert.ok(
        report.closeCodes.includes(CloseCode.TryAgainLater),
        `closes: ${report.closeCodes}`,
      );
    },
  );

  await t.step("the walsender terminated by pg_terminate_backend: close 1013, resume", async () => {
    const report = await inProcessScenario(
      "pg_terminate_backend(walsender)",
      async ({ db, slotName }) => {
        await sql(
          db,
          "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
          [
            slotName,
          ],
        );
      },
    );
    assert.deepEqual(report.closeCodes, [CloseCode.TryAgainLater]);
  });

  await t.step(
    "an idle stream outlives a short wal_sender_timeout, and its slot follows the WAL",
    async () => {
      await using postgres = await startPostgres({ settings: { wal_sender_timeout: "1s" } });
      const db = postgres.database;
      await createEvents(db);
      await using api = await startApi(db);
      const slotName = await init(api.url);
      await using client = await StreamClient.open(api.url, slotName);
      await sql(db, "INSERT INTO events VALUES (1)");
      const first = await client.next();
      client.ack(first.nextlsn);

      // WAL moves on with nothing to stream (a non-transactional message pgoutput does not send):
      // the slot must follow once the client has acknowledged everything.
      const [{ lsn }] = await sql<{ lsn: string }>(
        db,
        "SELECT pg_logical_emit_message(false, 'x', 'y')::text AS lsn",
      );
      await waitForSql(
        db,
        "SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = $1",
        [
          slotName,
          lsn,
        ],
      );
      // Three timeouts without traffic, by PostgreSQL's clock: a stream that did not answer its
      // keepalives would have been ended by now, and its walsender replaced on reconnect.
      const [{ pid }] = await sql<{ pid: number }>(
        db,
        "SELECT active_pid AS pid FROM pg_replication_slots WHERE slot_name = $1",
        [slotName],
      );
      await waitForSql(
        db,
        `SELECT coalesce((SELECT now() > backend_start + interval '3 s' FROM pg_stat_activity WHERE pid = $1),
                       true) AS ok`,
        [pid],
      );
      const [{ still }] = await sql<{ still: number }>(
        db,
        "SELECT active_pid AS still FROM pg_replication_slots WHERE slot_name = $1",
        [slotName],
      );
      assert.equal(still, pid);
      await sql(db, "INSERT INTO events VALUES (2)");
      assert.deepEqual((await client.next()).change[0].columnvalues, [2]);
    },
  );

  await t.step(
    "SIGTERM: sockets close with 1001, connections are released, the slot is kept",
    async () => {
      await using postgres = await startPostgres();
      const db = postgres.database;
      await createEvents(db);
      const server = await ServerProcess.spawn(db);
      const slotName = await init(server.url);
      const client = await StreamClient.open(server.url, slotName);
      await sql(db, "INSERT INTO events VALUES (1)");
      client.ack((await client.next()).nextlsn);
      const status = await server.kill("SIGTERM");
      assert.equal((await client.closedWithin()).code, CloseCode.GoingAway);
      assert.equal(status.code, 0);
      // The next start names the slot it finds (it holds WAL until streamed or dropped).
      const again = await ServerProcess.spawn(db);
      await again.kill("SIGTERM");
      assert.match(
        await again.output,
        new RegExp(`slots created earlier.*${slotName} \\(inactive, holding`),
      );
      const [{ slots }] = await sql<{ slots: number }>(
        db,
        "SELECT count(*)::int AS slots FROM pg_replication_slots WHERE slot_name = $1",
        [slotName],
      );
      assert.equal(slots, 1);
      // Its walsender and snapshot connections go away (PostgreSQL notices closed sockets promptly).
      await waitForSql(
        db,
        `SELECT count(*) = 0 AS ok FROM pg_stat_activity
          WHERE application_name = 'pgdeltastream' AND pid <> pg_backend_pid()`,
        [],
      );
    },
  );
});

/** What a fault is given: the database, the server in this process, the streamed slot. */
interface FaultContext {
  postgres: Awaited<ReturnType<typeof startPostgres>>;
  db: Parameters<typeof sql>[0];
  api: Awaited<ReturnType<typeof startApi>>;
  slotName: string;
}

/**
 * A steady writer of 600 rows and an acking consumer against an in-process
 * server; `fault` runs once, after the 200th frame. Checks the at-least-once
 * contract (every row, nothing re-sent past a confirmed ack) and returns the report.
 */
async function inProcessScenario(
  name: string,
  fault: (context: FaultContext) => Promise<void> | void,
  settle: (context: FaultContext) => Promise<void> = async () => {},
) {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await createEvents(db);
  const rows = 600;
  await using api = await startApi(db);
  const slotName = await init(api.url);
  const writer = writeEvents(db, rows);
  const report = await consume({
    url: () => api.url,
    slotName,
    rows,
    confirmedFlush: () => confirmedFlush(db, slotName),
    onFrame: (frames) => frames === 200 ? fault({ postgres, db, api, slotName }) : undefined,
  });
  await writer;
  await settle({ postgres, db, api, slotName });
  summarize(name, rows, report);
  assert.equal(report.resentAfterConfirm, 0, "an acknowledged transaction was sent again");
  return report;
}
