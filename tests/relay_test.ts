import assert from "node:assert/strict";
import {
  type ChangeStream,
  connectStream,
  type RowChange,
  StreamClosedError,
} from "../client/mod.ts";
import type { DatabaseConfig } from "../src/config.ts";
import { CloseCode } from "../src/protocol.ts";
import { deadline, poll } from "./support/deadline.ts";
import { SignJWT } from "jose";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { consumerName, logName, logSubject } from "../src/relay/jetstream_log.ts";
import {
  createStream,
  ServerProcess,
  sql,
  startPostgres,
  StreamClient,
  streamState,
  waitForSql,
  WEBSOCKET_HANDSHAKE,
} from "./support/harness.ts";
import { hasNats, NatsServer } from "./support/nats.ts";

const REQUIRE = Deno.env.get("REQUIRE_NATS") === "1";
if (!hasNats && REQUIRE) throw new Error("REQUIRE_NATS=1 but nats-server is not installed");

/** A relay-mode server process named `instance`. */
function relayServer(db: DatabaseConfig, nats: NatsServer, instance: string, env = {}) {
  return ServerProcess.spawn(db, {
    NATS_URL: nats.url,
    RELAY_INSTANCE: instance,
    SLOT_BUSY_TIMEOUT_SECONDS: "5",
    ...env,
  });
}

/** What the single-instance relay tests share: PostgreSQL with table `feed`, NATS, one server. */
interface SoloRelay extends AsyncDisposable {
  db: DatabaseConfig;
  nats: NatsServer;
  server: ServerProcess;
}

/** PostgreSQL, NATS and the relay server "solo" (with `env`), stopped in reverse order. */
async function soloRelay(env: Record<string, string> = {}): Promise<SoloRelay> {
  const stack = new AsyncDisposableStack();
  try {
    const postgres = stack.use(await startPostgres());
    const db = postgres.database;
    await sql(db, "CREATE TABLE feed(id int primary key)");
    const nats = stack.use(await NatsServer.start());
    const server = stack.use(await relayServer(db, nats, "solo", env));
    return { db, nats, server, [Symbol.asyncDispose]: () => stack.disposeAsync() };
  } catch (error) {
    await stack.disposeAsync();
    throw error;
  }
}

/** Inserts rows 1..count into `feed`, one transaction each, pacing itself. */
async function writer(db: DatabaseConfig, from: number, to: number, paceMs: number) {
  for (let id = from; id <= to; id++) {
    await sql(db, "INSERT INTO feed VALUES ($1)", [id]);
    await new Promise((resolve) => setTimeout(resolve, paceMs));
  }
}

Deno.test({
  name:
    "relay: 3 instances, 300 consumers; publisher, consumer's instance and NATS killed mid-load; nothing lost",
  ignore: !hasNats,
  async fn(t) {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, "CREATE TABLE feed(id int primary key)");
    await using nats = await NatsServer.start();
    const names = ["i0", "i1", "i2"];
    const servers = new Map<string, ServerProcess>();
    for (const name of names) servers.set(name, await relayServer(db, nats, name));
    try {
      const alive = () => [...servers.values()];
      const any = () => alive()[Math.floor(Math.random() * alive().length)].url;
      await createStream(alive()[0].url, { name: "feed", tables: ["feed"] });
      const publisher = await poll(
        async () => (await streamState(any(), "feed")).relay?.publisher,
        "a publisher",
      );
      assert.ok(names.includes(publisher), publisher);

      const TOTAL = 150;
      const CONSUMERS = 300;
      const received = new Map<string, number[]>();
      const readers: Promise<void>[] = [];
      const failures: string[] = [];
      const streams: ChangeStream[] = [];
      for (let i = 0; i < CONSUMERS; i++) {
        const id = `c${i}`;
        const home = names[i % names.length];
        // Each consumer starts on its own instance and moves to a live one when that one dies.
        const url = () => servers.get(home)?.url ?? any();
        const stream = connectStream({
          url,
          stream: "feed",
          consumer: id,
          reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
        });
        streams.push(stream);
        const ids: number[] = [];
        received.set(id, ids);
        readers.push(
          (async (): Promise<void> => {
            for await (const tx of stream) {
              for (const change of tx.changes) {
                if (change.kind === "insert") {
                  ids.push((change as RowChange).columnvalues![0] as number);
                }
              }
              if (ids.at(-1) === TOTAL) {
                stream.acknowledge(tx);
                return;
              }
            }
          })().catch((error) => {
            failures.push(`${id}: ${error}`);
          }),
        );
      }
      await t.step("every consumer gets the first transactions", async () => {
        await writer(db, 1, 30, 10);
        await poll(
          () => [...received.values()].every((ids) => ids.length >= 30),
          "300 consumers to have 30 rows",
        );
      });

      await t.step(
        "kill -9 of the publisher: another instance takes over, nothing lost",
        async () => {
          const killedAt = performance.now();
          await servers.get(publisher)!.kill("SIGKILL");
          servers.delete(publisher);
          const writing = writer(db, 31, 80, 10);
          const next = await poll(
            async () => {
              const relay = (await streamState(any(), "feed")).relay;
              return relay?.publisher && relay.publisher !== publisher
                ? relay.publisher
                : undefined;
            },
            "another instance to publish",
            { intervalMs: 50 },
          );
          console.log(
            `failover: ${next} publishes ${
              ((performance.now() - killedAt) / 1000).toFixed(1)
            } s after the kill`,
          );
          await writing;
          await poll(
            () => [...received.values()].every((ids) => ids.length >= 80),
            "every consumer to have 80 rows",
          );
          // The killed instance comes back as a standby.
          servers.set(publisher, await relayServer(db, nats, publisher));
        },
      );

      await t.step("NATS killed and restarted mid-load (file storage): no loss", async () => {
        const writing = writer(db, 81, 120, 10);
        await poll(
          () => [...received.values()].some((ids) => ids.length >= 85),
          "the load to be under way",
        );
        await nats.kill();
        // NATS stays down while the writer commits ten more: the publisher must catch up afterwards.
        await waitForSql(db, "SELECT max(id) >= 95 AS ok FROM feed");
        await nats.restart();
        await writing;
        await poll(
          () => [...received.values()].every((ids) => ids.length >= 120),
          "every consumer to have 120 rows",
        ).catch(async (error) => {
          // Say who is behind, where, and what the log and NATS think of them.
          const behind = [...received].filter(([, ids]) => ids.length < 120);
          const { relay } = await streamState(any(), "feed");
          const standing = new Map(relay!.consumers.map((c) => [c.id, c]));
          const sample = behind.slice(0, 8).map(([id, ids]) =>
            `${id} (home ${names[Number(id.slice(1)) % names.length]}) has ${ids.length}, last ${
              ids.at(-1)
            }; NATS: ${
              JSON.stringify(standing.get(`c_${id}`) ?? standing.get(id) ?? "no consumer")
            }`
          );
          throw new Error(
            `${error.message}: ${behind.length} behind; log ${JSON.stringify(relay!.log)}; ` +
              `publisher ${relay!.publisher}\n${sample.join("\n")}`,
          );
        });
      });

      await t.step(
        "kill -9 of a consumer's instance: it resumes on another after its last ack",
        async () => {
          const current = (await streamState(any(), "feed")).relay!.publisher!;
          // Not the publisher, nor the instance killed before: its consumers moved away then.
          const victim = names.find((n) => n !== current && n !== publisher)!;
          await servers.get(victim)!.kill("SIGKILL");
          servers.delete(victim);
          await writer(db, 121, TOTAL, 10);
          await deadline(Promise.all(readers), "every consumer to read every transaction");
        },
      );

      await t.step(
        "each of the 300 consumers got every transaction exactly once, in commit order",
        () => {
          assert.deepEqual(failures, [], "a consumer's stream failed");
          const expected = Array.from({ length: TOTAL }, (_, i) => i + 1);
          for (const [id, ids] of received) assert.deepEqual(ids, expected, `consumer ${id}`);
        },
      );

      await t.step("the stream's state shows the log and each consumer's standing", async () => {
        await Promise.all(streams.map((s) => s.close()));
        const { relay } = await streamState(any(), "feed");
        assert.ok(relay!.log!.messages >= TOTAL);
        assert.equal(relay!.consumers.length, CONSUMERS);
        const metrics = await (await fetch(new URL("/metrics", any()))).text();
        assert.match(metrics, /pgdeltastream_relay_log_messages\{stream="feed"\} \d+/);
      });
    } finally {
      await Promise.all([...servers.values()].map((s) => s.kill("SIGKILL")));
    }
  },
});

Deno.test({
  name: "relay: one connection per consumer id; a consumer beyond the log's retention gets 4411",
  ignore: !hasNats,
  async fn() {
    await using relay = await soloRelay({ RELAY_MAX_MESSAGES: "5" });
    const { db, server } = relay;
    await createStream(server.url, { name: "feed", tables: ["feed"] });
    const late = connectStream({ url: server.url, stream: "feed", consumer: "late" });
    await sql(db, "INSERT INTO feed VALUES (1)");
    const first = await deadline(late.next(), "the first transaction");
    assert.ok(first);
    // A second connection with the same id is refused while the first is open.
    const conflict = await fetch(new URL("/v2/streams/feed/changes?consumer=late", server.url), {
      headers: WEBSOCKET_HANDSHAKE,
    });
    assert.equal(conflict.status, 409);
    assert.match((await conflict.json()).error, /connected elsewhere/);
    late.acknowledge(first);
    await late.close();
    await writer(db, 2, 20, 0);
    await poll(
      async () => ((await streamState(server.url, "feed")).relay?.log?.firstSeq ?? 0) > 2,
      "retention to drop old frames",
    );
    const again = connectStream({ url: server.url, stream: "feed", consumer: "late" });
    const error = await deadline(again.next().then(() => undefined, (e) => e), "the 4411");
    assert.ok(error instanceof StreamClosedError, String(error));
    assert.equal(error.code, CloseCode.BeyondRetention);
    assert.match(error.reason, /fell out of stream feed's log retention/);
  },
});

Deno.test({
  name: "relay: consumers and tails need a grant, and close with 4401 when their token expires",
  ignore: !hasNats,
  async fn() {
    const secret = "relay-secret-" + crypto.randomUUID() + crypto.randomUUID();
    const admin = "relay-admin-" + crypto.randomUUID();
    await using relay = await soloRelay({ JWT_SECRET: secret, ADMIN_TOKENS: admin });
    const { server } = relay;
    const created = await fetch(new URL("/v2/streams", server.url), {
      method: "POST",
      headers: { authorization: `Bearer ${admin}`, "content-type": "application/json" },
      body: JSON.stringify({ name: "feed", tables: ["feed"] }),
    });
    assert.equal(created.status, 201, await created.text());
    const token = (streams: string[], seconds: number) =>
      new SignJWT({ aud: "pgdeltastream", streams, exp: Math.floor(Date.now() / 1000) + seconds })
        .setProtectedHeader({ alg: "HS256" })
        .sign(new TextEncoder().encode(secret));
    for (
      const [credential, status] of [[undefined, 401], [await token(["other"], 60), 403]] as const
    ) {
      for (const path of ["changes?consumer=c1", "tail"]) {
        const response = await fetch(
          new URL(
            `/v2/streams/feed/${path}${
              credential ? `${path.includes("?") ? "&" : "?"}access_token=${credential}` : ""
            }`,
            server.url,
          ),
          { headers: WEBSOCKET_HANDSHAKE },
        );
        assert.equal(response.status, status, path);
        await response.body?.cancel();
      }
    }
    const shortLived = await token(["feed"], 2);
    await using consumer = await StreamClient.connect(
      server.url,
      `/v2/streams/feed/changes?consumer=c1&access_token=${shortLived}`,
    );
    await using tail = await StreamClient.connect(
      server.url,
      `/v2/streams/feed/tail?access_token=${shortLived}`,
    );
    // A relay tail counts as any tail does.
    const shown = await fetch(new URL("/v2/streams/feed", server.url), {
      headers: { authorization: `Bearer ${admin}` },
    });
    assert.equal((await shown.json()).tails, 1);
    assert.equal((await consumer.closedWithin()).code, CloseCode.TokenExpired);
    assert.equal((await tail.closedWithin()).code, CloseCode.TokenExpired);
  },
});

Deno.test({
  name: "relay: a consumer whose durable consumer vanished from NATS is re-created where it was",
  ignore: !hasNats,
  async fn() {
    await using relay = await soloRelay();
    const { db, nats, server } = relay;
    await createStream(server.url, { name: "feed", tables: ["feed"] });
    const stream = connectStream({ url: server.url, stream: "feed", consumer: "x" });
    const ids: number[] = [];
    const reading = (async () => {
      for await (const tx of stream) {
        for (const change of tx.changes) {
          if (change.kind === "insert") ids.push((change as RowChange).columnvalues![0] as number);
        }
        stream.acknowledge(tx);
        if (ids.at(-1) === 3) return;
      }
    })();
    await sql(db, "INSERT INTO feed VALUES (1)");
    await poll(() => ids.length === 1, "the first row");
    // What a reposition cut short by a NATS failure leaves: the durable consumer deleted.
    const nc = await connect({ servers: nats.url });
    try {
      const jsm = await jetstreamManager(nc);
      await jsm.consumers.delete(logName("feed"), consumerName("x"));
    } finally {
      await nc.close();
    }
    await sql(db, "INSERT INTO feed VALUES (2); INSERT INTO feed VALUES (3)");
    await deadline(reading, "rows 2 and 3 after the durable consumer was deleted");
    assert.deepEqual(ids, [1, 2, 3]);
    await stream.close();
  },
});

Deno.test({
  name: "relay: a publish that fails is retried at once, not when the next transaction comes",
  ignore: !hasNats,
  async fn() {
    await using relay = await soloRelay();
    const { db, nats, server } = relay;
    await createStream(server.url, { name: "feed", tables: ["feed"] });
    await sql(db, "INSERT INTO feed VALUES (1)");
    await poll(
      async () => (await streamState(server.url, "feed")).relay?.log?.lastSeq === 1,
      "the first transaction in the log",
    );
    // A message the publisher did not write: its next publish, expecting its own last message,
    // is refused (as after a NATS failure that lost or reordered what it had in flight).
    const nc = await connect({ servers: nats.url });
    try {
      await nc.request(logSubject("feed"), "not a frame", { timeout: 5000 });
    } finally {
      await nc.close();
    }
    await sql(db, "INSERT INTO feed VALUES (2)");
    // Nothing more is written: the publisher must start again after the refusal by itself.
    await poll(
      async () => (await streamState(server.url, "feed")).relay?.log?.lastSeq === 3,
      "the second transaction in the log, after the refused publish",
    );
  },
});

Deno.test({
  name: "relay: a token that names its consumer id connects only as that consumer",
  ignore: !hasNats,
  async fn() {
    const secret = "relay-secret-" + crypto.randomUUID() + crypto.randomUUID();
    const admin = "relay-admin-" + crypto.randomUUID();
    await using relay = await soloRelay({ JWT_SECRET: secret, ADMIN_TOKENS: admin });
    const { db, server } = relay;
    const asAdmin = { authorization: `Bearer ${admin}`, "content-type": "application/json" };
    const created = await fetch(new URL("/v2/streams", server.url), {
      method: "POST",
      headers: asAdmin,
      body: JSON.stringify({ name: "feed", tables: ["feed"] }),
    });
    assert.equal(created.status, 201, await created.text());
    const token = (claims: Record<string, unknown>) =>
      new SignJWT({
        aud: "pgdeltastream",
        streams: ["feed"],
        exp: Math.floor(Date.now() / 1000) + 600,
        ...claims,
      }).setProtectedHeader({ alg: "HS256" }).sign(new TextEncoder().encode(secret));
    const upgrade = async (credential: string, consumer?: string) => {
      const query = new URLSearchParams({ access_token: credential });
      if (consumer !== undefined) query.set("consumer", consumer);
      const response = await fetch(new URL(`/v2/streams/feed/changes?${query}`, server.url), {
        headers: WEBSOCKET_HANDSHAKE,
      });
      return { status: response.status, body: await response.text() };
    };
    const appA = await token({ consumer: "app-a" });
    const bySub = await token({ sub: "app-c" });
    const minted = await fetch(new URL("/v2/streams/feed/tokens", server.url), {
      method: "POST",
      headers: asAdmin,
      body: JSON.stringify({ ttlSeconds: 600, consumer: "app-m" }),
    });
    assert.equal(minted.status, 201);
    const mintedToken = (await minted.json()).token as string;
    // Acting as another application's consumer (its position, its lease) is refused.
    for (
      const [credential, other, own] of [
        [appA, "app-b", "app-a"],
        [bySub, "app-d", "app-c"],
        [mintedToken, "app-x", "app-m"],
      ]
    ) {
      const refused = await upgrade(credential, other);
      assert.equal(refused.status, 403, refused.body);
      assert.match(JSON.parse(refused.body).error, new RegExp(`only as consumer "${own}"`));
    }
    const malformed = await upgrade(await token({ consumer: "no spaces allowed" }));
    assert.equal(malformed.status, 401, malformed.body);
    assert.equal(
      await fetch(new URL("/v2/streams/feed/tokens", server.url), {
        method: "POST",
        headers: asAdmin,
        body: JSON.stringify({ consumer: "a/b" }),
      }).then(async (r) => (await r.body?.cancel(), r.status)),
      400,
    );
    // Without ?consumer= the token's own id is used; naming it is allowed too.
    const stream = connectStream({ url: server.url, stream: "feed", token: appA });
    await sql(db, "INSERT INTO feed VALUES (1)");
    assert.ok(await deadline(stream.next(), "app-a's first transaction"));
    const consumers = async (): Promise<{ id: string; leasedBy: string | null }[]> =>
      (await (await fetch(new URL("/v2/streams/feed", server.url), { headers: asAdmin })).json())
        .relay.consumers;
    const ids = async () => (await consumers()).map((c) => c.id);
    assert.deepEqual(await ids(), ["app-a"]);
    // While connected, the stream's state names the instance holding the consumer's lease.
    assert.equal(typeof (await consumers())[0].leasedBy, "string");
    await stream.close();
    await poll(
      async () => (await consumers())[0].leasedBy === null,
      "app-a's lease to be let go after its close",
    );
    // An admin may act as any consumer.
    await using adminConsumer = await StreamClient.connect(
      server.url,
      `/v2/streams/feed/changes?consumer=app-b&access_token=${admin}`,
    );
    const frame = await adminConsumer.nextV2();
    assert.deepEqual(
      frame.change.filter((c) => c.kind === "insert").map((c) => (c as RowChange).columnvalues),
      [[1]],
    );
  },
});

Deno.test({
  name:
    "relay: transactions larger than a chunk survive a kill -9 of their publisher mid-publish, every change once",
  ignore: !hasNats,
  async fn() {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, "CREATE TABLE feed(id int primary key, pad text)");
    await using nats = await NatsServer.start();
    // Small chunks, and different ones on each instance: a resumed transaction must not depend on them.
    const servers = new Map<string, ServerProcess>([
      ["a", await relayServer(db, nats, "a", { FRAME_CHUNK_BYTES: "4096" })],
      ["b", await relayServer(db, nats, "b", { FRAME_CHUNK_BYTES: "9000" })],
    ]);
    try {
      const any = () => [...servers.values()][0].url;
      await createStream(any(), { name: "feed", tables: ["feed"] });
      const first = await poll(
        async () => (await streamState(any(), "feed")).relay?.publisher,
        "a publisher",
      );
      const ROWS = 60_000;
      // The consumer connects to the instance that survives.
      const survivor = [...servers.keys()].find((n) => n !== first)!;
      const stream = connectStream({
        url: () => servers.get(survivor)!.url,
        stream: "feed",
        consumer: "replica",
        reconnect: { initialDelayMs: 100, maxDelayMs: 1000 },
      });
      const seen = new Map<number, number>();
      const reading = (async () => {
        for await (const tx of stream) {
          for (const change of tx.changes) {
            if (change.kind !== "insert") continue;
            const id = (change as RowChange).columnvalues![0] as number;
            seen.set(id, (seen.get(id) ?? 0) + 1);
          }
          stream.acknowledge(tx);
          if (seen.has(ROWS + 1)) return;
        }
      })();
      // One transaction of many chunks; the publisher dies once some of them, not all, are in the log.
      const nc = await connect({ servers: nats.url });
      try {
        const jsm = await jetstreamManager(nc);
        await sql(
          db,
          `INSERT INTO feed SELECT g, repeat('x', 100) FROM generate_series(1, ${ROWS}) g`,
        );
        await poll(
          async () => {
            const last = await jsm.streams.getMessage(logName("feed"), {
              last_by_subj: logSubject("feed"),
            }).catch(() => undefined);
            return last?.header.get("Nats-Msg-Id").includes("+") &&
              (await jsm.streams.info(logName("feed"))).state.messages > 20;
          },
          "the publisher to be part-way through the large transaction",
          { intervalMs: 5 },
        );
      } finally {
        await nc.close();
      }
      await servers.get(first)!.kill("SIGKILL");
      servers.delete(first);
      await sql(db, `INSERT INTO feed VALUES (${ROWS + 1}, 'after')`);
      await deadline(reading, "every row of the large transaction and the one after it");
      await stream.close();
      const missing = Array.from({ length: ROWS + 1 }, (_, i) => i + 1).filter((id) =>
        !seen.has(id)
      );
      const repeated = [...seen].filter(([, n]) => n > 1).length;
      assert.deepEqual(missing.slice(0, 10), [], `${missing.length} rows missing`);
      assert.equal(repeated, 0, "rows delivered twice");
    } finally {
      await Promise.all([...servers.values()].map((s) => s.kill("SIGKILL")));
    }
  },
});
