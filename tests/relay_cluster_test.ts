import assert from "node:assert/strict";
import { type ChangeStream, connectStream, type RowChange } from "../client/mod.ts";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { logName } from "../src/relay/jetstream_log.ts";
import { deadline, poll } from "./support/deadline.ts";
import { createStream, ServerProcess, sql, startPostgres, streamState } from "./support/harness.ts";
import { hasNats, NatsCluster } from "./support/nats.ts";

const REQUIRE = Deno.env.get("REQUIRE_NATS") === "1";
if (!hasNats && REQUIRE) throw new Error("REQUIRE_NATS=1 but nats-server is not installed");

Deno.test({
  name:
    "relay on a 3-node NATS cluster (RELAY_REPLICAS=3): kill -9 of the log's leader mid-burst loses nothing",
  ignore: !hasNats,
  async fn(t) {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, "CREATE TABLE feed(id int primary key)");
    await using cluster = await NatsCluster.start(3);
    await cluster.jetStreamReady();
    const env = (instance: string) => ({
      NATS_URL: cluster.url,
      RELAY_INSTANCE: instance,
      RELAY_REPLICAS: "3",
      SLOT_BUSY_TIMEOUT_SECONDS: "5",
    });
    await using a = await ServerProcess.spawn(db, env("a"));
    await using b = await ServerProcess.spawn(db, env("b"));
    await createStream(a.url, { name: "feed", tables: ["feed"] });
    await poll(async () => (await streamState(a.url, "feed")).relay?.publisher, "a publisher");

    await t.step("the log and the lease bucket are kept on 3 nodes", async () => {
      const nc = await connect({ servers: cluster.url.split(",") });
      try {
        const jsm = await jetstreamManager(nc);
        for (const stream of [logName("feed"), "KV_pgds_leases"]) {
          const info = await jsm.streams.info(stream);
          assert.equal(info.config.num_replicas, 3, stream);
          assert.equal(info.cluster?.replicas?.length, 2, `${stream}: a leader and 2 replicas`);
        }
      } finally {
        await nc.close();
      }
    });

    const TOTAL = 300;
    const CONSUMERS = 20;
    /** Per consumer: each insert's id and when it arrived. */
    const received = new Map<string, { id: number; at: number }[]>();
    const readers: Promise<void>[] = [];
    const streams: ChangeStream[] = [];
    for (let i = 0; i < CONSUMERS; i++) {
      const id = `c${i}`;
      const arrivals: { id: number; at: number }[] = [];
      received.set(id, arrivals);
      const stream = connectStream({
        url: (i % 2 === 0 ? a : b).url,
        stream: "feed",
        consumer: id,
        reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
      });
      streams.push(stream);
      readers.push((async () => {
        for await (const tx of stream) {
          for (const change of tx.changes) {
            if (change.kind !== "insert") continue;
            arrivals.push({
              id: (change as RowChange).columnvalues![0] as number,
              at: performance.now(),
            });
          }
          if (arrivals.at(-1)?.id === TOTAL) {
            stream.acknowledge(tx);
            return;
          }
        }
      })());
    }

    let written = 0;
    let writtenAtKill = 0;
    /** When each row's INSERT returned (committed). */
    const committedAt: number[] = [];
    let newLeader = "";
    await t.step("kill -9 of the log's stream leader while a writer runs", async () => {
      const writing = (async () => {
        for (let id = 1; id <= TOTAL; id++) {
          await sql(db, "INSERT INTO feed VALUES ($1)", [id]);
          committedAt[id] = performance.now();
          written = id;
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
      })();
      await poll(
        () => [...received.values()].every((arrivals) => arrivals.length >= 50),
        "every consumer to have 50 rows",
      );
      const leader = await cluster.leaderOf(logName("feed"));
      writtenAtKill = written;
      await cluster.kill(leader);
      console.log(`killed ${leader}, the leader of ${logName("feed")}, after row ${writtenAtKill}`);
      await writing;
      newLeader = await cluster.leaderOf(logName("feed"));
      await deadline(Promise.all(readers), "every consumer to read every transaction");
    });

    await t.step("every consumer got every transaction, in commit order", () => {
      let redelivered = 0;
      const waits: number[] = [];
      for (const [consumer, arrivals] of received) {
        // At least once: a frame sent again after a reconnect repeats ids already seen.
        const firsts: number[] = [];
        for (const { id, at } of arrivals) {
          if (id <= (firsts.at(-1) ?? 0)) {
            redelivered++;
            continue;
          }
          firsts.push(id);
          waits.push(at - committedAt[id]);
        }
        assert.deepEqual(firsts, Array.from({ length: TOTAL }, (_, i) => i + 1), consumer);
      }
      waits.sort((x, y) => x - y);
      const ms = (q: number) => waits[Math.min(waits.length - 1, Math.floor(q * waits.length))];
      console.log(
        `${CONSUMERS} consumers × ${TOTAL} transactions: 0 lost, ${redelivered} re-delivered; ` +
          `${newLeader} leads the log now; commit → consumer p50 ${ms(0.5).toFixed(0)} ms, ` +
          `longest ${(ms(1) / 1000).toFixed(1)} s (the rows committed while NATS elected)`,
      );
    });

    await t.step("the publisher and both instances keep serving", async () => {
      for (const server of [a, b]) {
        const { relay } = await streamState(server.url, "feed");
        assert.ok(["a", "b"].includes(relay!.publisher!), `publisher ${relay!.publisher}`);
        assert.ok(relay!.log!.lastSeq >= TOTAL);
      }
      await Promise.all(streams.map((s) => s.close()));
    });
  },
});
