/**
 * The database fails over: a real PostgreSQL 17 primary killed with
 * SIGKILL, its standby promoted. With failover slots synced to the standby,
 * a consumer notices nothing but a reconnect and its replica stays exact;
 * without them, the stream says so (4410) and no slot is made silently.
 */

import assert from "node:assert/strict";
import pg from "pg";
import { connectStream, type RowChange, StreamClosedError } from "../client/mod.ts";
import type { DatabaseConfig } from "../src/config.ts";
import { CloseCode } from "../src/protocol.ts";
import { deadline, poll } from "./support/deadline.ts";
import { createStream, init, ServerProcess, sql, streamState } from "./support/harness.ts";
import { startStandbyPair } from "./support/standby.ts";
import { hasNats, NatsServer } from "./support/nats.ts";

const SETUP = "CREATE TABLE items(id int primary key, v int)";

/** The server's environment for a primary and a standby, the standby listed first. */
function serverEnv(primary: DatabaseConfig, standby: DatabaseConfig): Record<string, string> {
  return {
    DATABASE_URL:
      `postgresql://postgres@127.0.0.1:${standby.port},127.0.0.1:${primary.port}/postgres?sslmode=disable&connect_timeout=5`,
    WAL_GUARD_INTERVAL_SECONDS: "1",
    SLOT_BUSY_TIMEOUT_SECONDS: "5",
    REPLICATION_TIMEOUT_SECONDS: "5",
  };
}

/** Whether the embedded PostgreSQL has failover slots. */
async function hasFailoverSlots(): Promise<boolean> {
  const bin = Deno.env.get("PG_BIN_DIR");
  if (bin === undefined) return true; // the default binaries are 17
  const { stdout } = await new Deno.Command(`${bin}/postgres`, { args: ["--version"] }).output();
  return Number(/(\d+)\./.exec(new TextDecoder().decode(stdout))?.[1]) >= 17;
}

const supported = await hasFailoverSlots();

/** A writer of inserts, updates and deletes to whichever server takes them. */
class Writer {
  #target: DatabaseConfig;
  #next = 1;
  readonly #ids: number[] = [];
  #stop = false;
  readonly done: Promise<void>;

  constructor(target: DatabaseConfig) {
    this.#target = target;
    this.done = this.#run();
  }

  /** Writes go to `target` from now on. */
  moveTo(target: DatabaseConfig): void {
    this.#target = target;
  }

  async #run(): Promise<void> {
    while (!this.#stop) {
      const client = new pg.Client(this.#target);
      client.on("error", () => {});
      try {
        await client.connect();
        while (!this.#stop) {
          const id = this.#next;
          await client.query("INSERT INTO items VALUES ($1, 0)", [id]);
          this.#ids.push(id);
          this.#next++;
          if (id % 3 === 0) {
            await client.query("UPDATE items SET v = v + 1 WHERE id = $1", [this.#ids[id % 7]]);
          }
          if (id % 5 === 0) await client.query("DELETE FROM items WHERE id = $1", [id - 4]);
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      } catch {
        // The primary died mid-write: a write that did not commit is not counted; try again.
        await new Promise((resolve) => setTimeout(resolve, 100));
      } finally {
        await client.end().catch(() => {});
      }
    }
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await this.done;
  }
}

/** A consumer (v2 stream or v1 slot) keeping an in-memory replica, acknowledging each transaction. */
function replicaOf(
  url: () => URL,
  target: { stream: string } | { slot: string },
  consumerId?: string,
) {
  const replica = new Map<number, number>();
  const consumer = connectStream({
    url,
    ...target,
    consumer: consumerId,
    reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
  });
  const reading = (async () => {
    for await (const tx of consumer) {
      for (const change of tx.changes as RowChange[]) {
        if (change.kind === "insert" || change.kind === "update") {
          replica.delete(change.oldkeys?.keyvalues[0] as number);
          replica.set(change.columnvalues![0] as number, change.columnvalues![1] as number);
        } else if (change.kind === "delete") {
          replica.delete(change.oldkeys!.keyvalues[0] as number);
        }
      }
    }
  })();
  return { replica, consumer, reading };
}

/**
 * Polls `check` as {@link poll} does, but fails at once if the consumer's
 * loop `reading` ended (with its error), and a failure carries the server's
 * last log lines: a failover that goes wrong says where.
 */
async function pollReplica(
  server: ServerProcess,
  reading: Promise<void>,
  check: () => boolean,
  what: string,
  ms?: number,
): Promise<void> {
  let ended: unknown;
  reading.then(
    () => (ended = new Error("the consumer's stream ended")),
    (error) => (ended = error),
  );
  try {
    await poll(
      () => {
        if (ended !== undefined) throw ended;
        return check();
      },
      what,
      { ms },
    );
  } catch (error) {
    const lines = server.printed.trimEnd().split("\n").slice(-60).join("\n");
    throw new Error(
      `${error instanceof Error ? error.message : String(error)}\n` +
        `the server's last log lines:\n${lines}`,
      { cause: error },
    );
  }
}

/** The table as the database has it. */
async function table(db: DatabaseConfig): Promise<Map<number, number>> {
  const rows = await sql<{ id: number; v: number }>(db, "SELECT id, v FROM items");
  return new Map(rows.map((r) => [r.id, r.v]));
}

Deno.test({
  name: "failover with synced slots: the consumer reconnects and its replica stays exact",
  ignore: !supported,
  async fn() {
    await using pair = await startStandbyPair(SETUP, { syncSlots: true });
    const { primary, standby } = pair;
    await using server = await ServerProcess.spawn(
      primary.database,
      serverEnv(primary.database, standby.database),
    );
    await createStream(server.url, { name: "items", tables: ["items"] });
    const v1Slot = await init(server.url);
    const { replica, consumer, reading } = replicaOf(() => server.url, { stream: "items" });
    const v1 = replicaOf(() => server.url, { slot: v1Slot });
    const writer = new Writer(primary.database);
    // A synced copy stays temporary until its slot was consumed past a running-transactions
    // record logged after the copy exists: only a synced, persistent copy survives promotion.
    await poll(
      async () => {
        await sql(primary.database, "SELECT pg_log_standby_snapshot()");
        const [{ ready }] = await sql<{ ready: number }>(
          standby.database,
          "SELECT count(*)::int AS ready FROM pg_replication_slots WHERE synced AND NOT temporary",
        );
        return ready >= 2;
      },
      "the stream's and the v1 slot's slots to be synced to the standby",
      { intervalMs: 200 },
    );
    const [{ failover }] = await sql<{ failover: boolean }>(
      primary.database,
      "SELECT bool_and(failover) AS failover FROM pg_replication_slots WHERE slot_type = 'logical'",
    );
    assert.equal(failover, true, "the server made failover slots");
    const status = await (await fetch(new URL("/v2/status", server.url))).json();
    assert.equal(status.failover.ready, true, JSON.stringify(status.failover));

    await poll(() => replica.size > 20, "the replica to fill");
    const killedAt = performance.now();
    await primary.kill();
    await standby.promote();
    writer.moveTo(standby.database);
    // The first change the new primary commits, and when a consumer has it.
    await sql(standby.database, "INSERT INTO items VALUES (900000, 0)");
    await pollReplica(
      server,
      reading,
      () => replica.has(900000),
      "the first change after the failover",
      120_000,
    );
    const firstAfter = performance.now();
    await new Promise((resolve) => setTimeout(resolve, 500));
    await writer.stop();
    await sql(standby.database, "INSERT INTO items VALUES (1000000, -1)");
    const want = await table(standby.database);
    for (
      const [label, copy, loop] of [["v2", replica, reading], [
        "v1",
        v1.replica,
        v1.reading,
      ]] as const
    ) {
      await pollReplica(
        server,
        loop,
        () => copy.get(1000000) === -1,
        `the ${label} consumer to get the last row`,
      );
      const missing = [...want.keys()].filter((id) => !copy.has(id));
      const phantom = [...copy.keys()].filter((id) => !want.has(id));
      const wrong = [...want].filter(([id, v]) => copy.has(id) && copy.get(id) !== v);
      console.log(
        `failover (${label}): ${want.size} rows, ${missing.length} missing, ${phantom.length} ` +
          `phantom, ${wrong.length} wrong`,
      );
      assert.deepEqual({ missing, phantom, wrong }, { missing: [], phantom: [], wrong: [] }, label);
    }
    console.log(
      `failover: the new primary's first change reached the consumer ${
        ((firstAfter - killedAt) / 1000).toFixed(1)
      } s after the old primary was killed (its promotion included)`,
    );
    const state = await streamState(server.url, "items");
    assert.equal(state.health, "ok", JSON.stringify(state));
    assert.equal(state.waitingFor, undefined);
    // A standby the new primary is told to wait for, and that is not there: the stream says so.
    await sql(standby.database, "ALTER SYSTEM SET synchronized_standby_slots = 'standby2'");
    await sql(standby.database, "SELECT pg_reload_conf()");
    await poll(
      async () => (await streamState(server.url, "items")).waitingFor,
      "the stream to say what it waits for",
    ).then((waiting) => assert.match(waiting, /standby slot standby2 is not connected/));
    for (const ended of [{ consumer, reading }, v1]) {
      await ended.consumer.close();
      await ended.reading;
    }
  },
});

Deno.test({
  name:
    "failover without synced slots: the stream is invalidated (4410), and no slot is made silently",
  ignore: !supported,
  async fn(t) {
    await using pair = await startStandbyPair(SETUP, { syncSlots: false });
    const { primary, standby } = pair;

    await t.step("a standby alone is refused at start, saying why", async () => {
      for (
        const [url, message] of [
          [
            `postgresql://postgres@127.0.0.1:${standby.port}/postgres?sslmode=disable`,
            /is a standby \(in recovery\), but the server needs the primary/,
          ],
          [
            `postgresql://postgres@127.0.0.1:${standby.port},127.0.0.1:${standby.port}/postgres?sslmode=disable`,
            /no host fits target_session_attrs=read-write: 127\.0\.0\.1:\d+: a standby/,
          ],
        ] as const
      ) {
        const error = await ServerProcess.spawn(standby.database, { DATABASE_URL: url }).then(
          async (server) => {
            await server.kill();
            throw new Error("the server started on a standby");
          },
          (error: Error) => error,
        );
        assert.match(error.message, message);
      }
    });

    await using server = await ServerProcess.spawn(
      primary.database,
      serverEnv(primary.database, standby.database),
    );
    await t.step("the standby listed first, every connection goes to the primary", async () => {
      await createStream(server.url, { name: "items", tables: ["items"] });
      const count = async (db: DatabaseConfig) =>
        (await sql<{ n: number }>(
          db,
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE application_name = 'pgdeltastream' AND pid <> pg_backend_pid()`,
        ))[0].n;
      assert.ok(await count(primary.database) > 0, "no connection on the primary");
      // Each new connection asks the standby first (the order given) and leaves it: none stays.
      await poll(async () => await count(standby.database) === 0, "no connection on the standby");
      const status = await (await fetch(new URL("/v2/status", server.url))).json();
      assert.equal(status.failover.ready, false);
      assert.match(status.failover.problems.join(" "), /synchronized_standby_slots is not set/);
    });

    await t.step("after the failover: 4410, invalidated, no new slot", async () => {
      const consumer = connectStream({
        url: server.url,
        stream: "items",
        reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
      });
      const outcome = (async () => {
        for await (const _ of consumer) { /* until it ends */ }
      })().then(() => undefined, (error) => error);
      await sql(primary.database, "INSERT INTO items VALUES (1, 1)");
      await primary.kill();
      await standby.promote();
      const error = await deadline(outcome, "the consumer to be told", 120_000);
      assert.ok(error instanceof StreamClosedError, String(error));
      assert.equal(error.code, CloseCode.StreamInvalidated);
      const state = await streamState(server.url, "items");
      assert.equal(state.health, "invalidated");
      assert.match(
        state.invalidated!.reason,
        /does not exist on the PostgreSQL at 127\.0\.0\.1:\d+/,
      );
      const slots = await sql(
        standby.database,
        "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'",
      );
      assert.deepEqual(slots, [], "a slot was made on the new primary");
    });
  },
});

Deno.test({
  name:
    "failover in relay mode: the publisher follows the database, consumers of the log stay exact",
  ignore: !supported || !hasNats,
  async fn() {
    await using pair = await startStandbyPair(SETUP, { syncSlots: true });
    const { primary, standby } = pair;
    await using nats = await NatsServer.start();
    await using server = await ServerProcess.spawn(primary.database, {
      ...serverEnv(primary.database, standby.database),
      NATS_URL: nats.url,
      RELAY_INSTANCE: "solo",
    });
    await createStream(server.url, { name: "items", tables: ["items"] });
    const { replica, consumer, reading } = replicaOf(() => server.url, { stream: "items" }, "c1");
    const writer = new Writer(primary.database);
    await poll(
      async () => {
        await sql(primary.database, "SELECT pg_log_standby_snapshot()");
        const [{ ready }] = await sql<{ ready: number }>(
          standby.database,
          "SELECT count(*)::int AS ready FROM pg_replication_slots WHERE synced AND NOT temporary",
        );
        return ready >= 1;
      },
      "the stream's slot to be synced to the standby",
      { intervalMs: 200 },
    );
    await poll(() => replica.size > 20, "the replica to fill");
    await primary.kill();
    await standby.promote();
    writer.moveTo(standby.database);
    await new Promise((resolve) => setTimeout(resolve, 500));
    await writer.stop();
    await sql(standby.database, "INSERT INTO items VALUES (1000000, -1)");
    await pollReplica(
      server,
      reading,
      () => replica.get(1000000) === -1,
      "the last row, through the log",
      120_000,
    );
    const want = await table(standby.database);
    const missing = [...want.keys()].filter((id) => !replica.has(id));
    const phantom = [...replica.keys()].filter((id) => !want.has(id));
    const wrong = [...want].filter(([id, v]) => replica.has(id) && replica.get(id) !== v);
    console.log(
      `failover (relay): ${want.size} rows, ${missing.length} missing, ${phantom.length} phantom, ` +
        `${wrong.length} wrong`,
    );
    assert.deepEqual({ missing, phantom, wrong }, { missing: [], phantom: [], wrong: [] });
    await consumer.close();
    await reading;
  },
});
