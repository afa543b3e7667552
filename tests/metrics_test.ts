import assert from "node:assert/strict";
import { type Change, CloseCode, type TransactionFrame } from "../src/protocol.ts";
import { Logger } from "../src/observability/log.ts";
import { poll } from "./support/deadline.ts";
import {
  captureLog,
  createStream,
  deleteAt,
  init,
  postJson,
  ServerProcess,
  sql,
  startApi,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";

/** The value of `name{labels}` in a Prometheus exposition; undefined when absent. */
function sample(
  text: string,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const match = /^([a-z_]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (match === null || match[1] !== name) continue;
    const have = Object.fromEntries(
      [...(match[2] ?? "").matchAll(/([a-z_]+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
    );
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(match[3]);
  }
  return undefined;
}

Deno.test("metrics: /metrics shows per-stream delivery, lag, latency and requests that move under load", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE items(id int primary key, note text)");
  using captured = captureLog();
  await using api = await startApi(db, { slotBusyTimeoutSeconds: 5 });
  const scrape = async () => {
    const response = await fetch(new URL("/metrics", api.url));
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/plain/);
    return await response.text();
  };
  const events = captured.events;
  await createStream(api.url, { name: "items-feed", tables: ["items"] });
  const stream = { stream: "items-feed" };

  await t.step("a stream no consumer has connected to yet shows as 0, not as missing", async () => {
    assert.equal(sample(await scrape(), "pgdeltastream_stream_connected", stream), 0);
  });

  await t.step(
    "frames, changes, bytes, acks and latency count what one consumer was sent",
    async () => {
      await using client = await StreamClient.changes(api.url, "items-feed");
      await poll(
        async () => sample(await scrape(), "pgdeltastream_stream_connected", stream) === 1,
        "the stream to show as connected",
      );
      for (let i = 1; i <= 5; i++) await sql(db, "INSERT INTO items VALUES ($1, 'x')", [i]);
      await sql(db, "INSERT INTO items SELECT g, 'y' FROM generate_series(6, 25) g");
      let last = "";
      for (let i = 0; i < 6; i++) last = (await client.next()).nextlsn;
      client.ack(last);
      const text = await poll(async () => {
        const text = await scrape();
        return sample(text, "pgdeltastream_acks_total", stream) === 1 ? text : undefined;
      }, "the ack to be counted");
      assert.equal(sample(text, "pgdeltastream_frames_sent_total", stream), 6);
      // 25 rows, and the schema change a v2 stream sends before a table's first change.
      assert.equal(sample(text, "pgdeltastream_changes_sent_total", stream), 26);
      assert.ok(sample(text, "pgdeltastream_bytes_sent_total", stream)! > 25 * 40);
      assert.equal(sample(text, "pgdeltastream_commit_to_send_seconds_count", stream), 6);
      assert.equal(sample(text, "pgdeltastream_redelivered_frames_total", stream) ?? 0, 0);
      assert.ok(sample(text, "process_resident_memory_bytes")! > 1 << 20);
      assert.ok(sample(text, "process_cpu_seconds_total")! > 0);
    },
  );

  await t.step("frames sent again after a reconnect are counted as redelivered", async () => {
    await sql(db, "INSERT INTO items VALUES (100, 'unacked')");
    {
      await using client = await StreamClient.changes(api.url, "items-feed");
      await client.next(); // not acked
    }
    await using again = await StreamClient.changes(api.url, "items-feed");
    const frame = await again.next();
    assert.deepEqual(frame.change.find((c) => c.kind === "insert")?.columnvalues, [
      100,
      "unacked",
    ]);
    const text = await scrape();
    assert.equal(sample(text, "pgdeltastream_redelivered_frames_total", stream), 1);
  });

  await t.step("lag shows the WAL the slot holds back, and falls once acknowledged", async () => {
    await using client = await StreamClient.changes(api.url, "items-feed");
    await client.next(); // row 100, again
    await sql(
      db,
      "INSERT INTO items SELECT g, repeat('z', 1000) FROM generate_series(200, 1200) g",
    );
    let frame = await client.next();
    while (frame.partial) frame = await client.next(); // the transaction's last chunk acks it
    const held = await poll(async () => {
      const lag = sample(await scrape(), "pgdeltastream_stream_lag_bytes", stream);
      return lag !== undefined && lag > 1_000_000 ? lag : undefined;
    }, "the lag to exceed the 1 MB written");
    client.ack(frame.nextlsn);
    await poll(async () => {
      const lag = sample(await scrape(), "pgdeltastream_stream_lag_bytes", stream)!;
      return lag < held / 2;
    }, "the lag to fall after the ack");
  });

  await t.step("tails, snapshot rows and HTTP requests by route pattern", async () => {
    await using tail = await StreamClient.connect(api.url, "/v2/streams/items-feed/tail");
    await poll(
      async () => sample(await scrape(), "pgdeltastream_tail_clients", stream) === 1,
      "the tail to be counted",
    );
    await tail.socket.close();
    const slot = await init(api.url);
    const page = await postJson(new URL("/v1/snapshot/data", api.url), {
      slotName: slot,
      table: "items",
      limit: 7,
    });
    assert.equal(page.status, 200);
    const text = await scrape();
    assert.equal(sample(text, "pgdeltastream_snapshot_rows_total", { stream: "v1" }), 7);
    assert.equal(
      sample(text, "pgdeltastream_http_requests_total", {
        route: "/v2/streams",
        method: "POST",
        status: "201",
      }),
      1,
    );
    assert.equal(
      sample(text, "pgdeltastream_http_requests_total", {
        route: "/v1/snapshot/data",
        method: "POST",
        status: "200",
      }),
      1,
    );
    assert.ok(
      sample(text, "pgdeltastream_http_requests_total", {
        route: "/v2/streams/:name/changes",
        status: "101",
      })! >= 3,
    );
  });

  await t.step("the log has one line per event, as JSON, with the resume position", () => {
    const seen = events();
    const kinds = new Set(seen.map((e) => e.event));
    for (const kind of ["stream.created", "consumer.connected", "consumer.disconnected"]) {
      assert.ok(kinds.has(kind), `no ${kind} in ${[...kinds]}`);
    }
    const connects = seen.filter((e) =>
      e.event === "consumer.connected" && e.stream === "items-feed"
    );
    assert.ok(connects.length >= 3);
    assert.match(String(connects.at(-1)!.resumeAfter), /^[0-9A-F]+\/[0-9A-F]+$/);
    const disconnect = seen.find((e) => e.event === "consumer.disconnected");
    assert.equal(disconnect?.closedBy, "client");
    for (const e of seen) assert.ok(typeof e.time === "string" && typeof e.msg === "string");
  });

  await t.step(
    "a backfill shows as queued, then its rows as sent, then as no longer active",
    async () => {
      const active = (text: string, state: string) =>
        sample(text, "pgdeltastream_backfill_active", { ...stream, state });
      assert.equal(active(await scrape(), "queued"), 0);
      const asked = await postJson(new URL("/v2/streams/items-feed/backfills", api.url), {
        table: "items",
      });
      assert.equal(asked.status, 202);
      const { id } = JSON.parse(asked.text);
      // Nobody is connected: it waits for a consumer.
      let text = await scrape();
      assert.equal(active(text, "queued"), 1);
      assert.equal(active(text, "running"), 0);
      await using client = await StreamClient.changes(api.url, "items-feed");
      let reads = 0;
      for (;;) {
        const frame: TransactionFrame<Change> = await client.nextV2();
        reads += frame.change.filter((c) => c.kind === "read").length;
        const done = frame.change.some((c) =>
          c.kind === "backfill" && c.id === id && c.state === "done"
        );
        if (done && !frame.partial) {
          client.ack(frame.nextlsn);
          break;
        }
      }
      const [{ rows }] = await sql<{ rows: number }>(db, "SELECT count(*)::int AS rows FROM items");
      assert.equal(reads, rows);
      text = await poll(async () => {
        const text = await scrape();
        return active(text, "queued") === 0 && active(text, "running") === 0 ? text : undefined;
      }, "the backfill to be counted as finished once its last frame was acknowledged");
      assert.equal(sample(text, "pgdeltastream_backfill_rows_total", stream), reads);
    },
  );

  await t.step(
    "deleting the stream closes its consumer (4000) and logs stream.dropped",
    async () => {
      await using client = await StreamClient.changes(api.url, "items-feed");
      assert.equal(await deleteAt(api.url, "/v2/streams/items-feed"), 204);
      assert.equal((await client.closedWithin()).code, CloseCode.SlotDropped);
      await poll(
        () => events().some((e) => e.event === "stream.dropped"),
        "stream.dropped in the log",
      );
    },
  );
});

Deno.test("the log writes text or JSON lines at or above its level", () => {
  const lines: string[] = [];
  const logger = new Logger();
  logger.configure({ level: "warn", sink: (_level, line) => lines.push(line) });
  logger.info("stream.created", "not written");
  logger.warn("auth.refused", "written", { status: 401, path: "/v2/streams x" });
  assert.equal(lines.length, 1);
  assert.match(lines[0], /^\S+Z warn {2}auth\.refused: written status=401 path="\/v2\/streams x"$/);
  logger.configure({ format: "json", level: "debug" });
  logger.debug("consumer.connected", "now written", {
    resumeAfter: "0/16B3748",
    absent: undefined,
  });
  const event = JSON.parse(lines[1]);
  assert.deepEqual({ ...event, time: undefined }, {
    time: undefined,
    level: "debug",
    event: "consumer.connected",
    msg: "now written",
    resumeAfter: "0/16B3748",
  });
});

Deno.test("METRICS_TOKEN reads /metrics and nothing else; METRICS=off turns them off", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const METRICS_TOKEN = "metrics-" + crypto.randomUUID();
  const ADMIN = "admin-" + crypto.randomUUID();
  await using server = await ServerProcess.spawn(db, {
    ADMIN_TOKENS: ADMIN,
    METRICS_TOKEN,
    LOG_FORMAT: "json",
  });
  const get = (path: string, token?: string) =>
    fetch(new URL(path, server.url), {
      headers: token ? { authorization: `Bearer ${token}` } : {},
    });

  await t.step("401 without a credential, 200 with METRICS_TOKEN or an admin token", async () => {
    const none = await get("/metrics");
    assert.equal(none.status, 401);
    await none.body?.cancel();
    for (const token of [METRICS_TOKEN, ADMIN]) {
      const ok = await get("/metrics", token);
      assert.equal(ok.status, 200);
      assert.match(await ok.text(), /pgdeltastream_http_requests_total/);
    }
  });

  await t.step("METRICS_TOKEN is refused (403) everywhere else", async () => {
    for (const path of ["/v2/streams", "/v2/status"]) {
      const response = await get(path, METRICS_TOKEN);
      assert.equal(response.status, 403);
      assert.match((await response.json()).error, /METRICS_TOKEN may read \/metrics only/);
    }
  });

  await t.step("LOG_FORMAT=json: every line is JSON, refusals too, never a token", async () => {
    await server.kill("SIGTERM");
    const output = await server.output;
    const events = output.split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l));
    assert.ok(events.some((e) => e.event === "startup.listening"));
    assert.ok(
      events.some((e) => e.event === "auth.refused" && e.status === 401 && e.path === "/metrics"),
    );
    assert.ok(events.some((e) => e.event === "auth.refused" && e.status === 403));
    assert.ok(!output.includes(METRICS_TOKEN) && !output.includes(ADMIN));
  });

  await t.step("METRICS=off answers 404", async () => {
    await using off = await startApi(db, { metrics: { enabled: false, historyIntervalMs: 5000 } });
    const response = await fetch(new URL("/metrics", off.url));
    assert.equal(response.status, 404);
    assert.match((await response.json()).error, /METRICS=off/);
  });
});
