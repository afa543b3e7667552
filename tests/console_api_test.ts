import assert from "node:assert/strict";
import type {
  EventListBody,
  HealthReport,
  MetricHistoryBody,
  StreamStateBody,
} from "../src/protocol.ts";
import { poll } from "./support/deadline.ts";
import {
  createStream,
  init,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  streamState,
} from "./support/harness.ts";

/** `GET path` of `base` as JSON, asserting `status`. */
async function getJson<T>(base: URL, path: string, status = 200): Promise<T> {
  const response = await fetch(new URL(path, base));
  const text = await response.text();
  assert.equal(response.status, status, `GET ${path}: ${text}`);
  return JSON.parse(text);
}

/** `PATCH /v2/streams/{name}` with `body`: its status and JSON body. */
async function patch(base: URL, name: string, body: unknown) {
  const response = await fetch(new URL(`/v2/streams/${name}`, base), {
    method: "PATCH",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

Deno.test("console API: events, metric history, limits and consumers as operators see them", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE items(id int primary key, note text)");
  await using api = await startApi(db, {
    metrics: { enabled: true, historyIntervalMs: 200 },
    walGuardIntervalMs: 200,
  });
  await createStream(api.url, { name: "feed", tables: ["items"] });

  await t.step(
    "GET /v2/events lists what happened, newest last, and ?after= only what is new",
    async () => {
      const first = await getJson<EventListBody>(api.url, "/v2/events");
      const created = first.events.findLast((e) => e.event === "stream.created");
      assert.ok(
        created,
        `no stream.created in ${JSON.stringify(first.events.map((e) => e.event))}`,
      );
      assert.equal(created.fields.stream, "feed");
      assert.match(created.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      const last = first.events.at(-1)!.id;
      {
        await using client = await StreamClient.changes(api.url, "feed");
        await poll(
          async () =>
            (await getJson<EventListBody>(api.url, `/v2/events?after=${last}`)).events
              .some((e) => e.event === "consumer.connected" && e.fields.stream === "feed"),
          "consumer.connected in /v2/events",
        );
        assert.ok(client.socket.readyState === WebSocket.OPEN);
      }
      const later = await poll(async () => {
        const { events } = await getJson<EventListBody>(api.url, `/v2/events?after=${last}`);
        return events.some((e) => e.event === "consumer.disconnected") ? events : undefined;
      }, "consumer.disconnected in /v2/events");
      assert.ok(later.every((e) => e.id > last), "?after= returned an event it had already seen");
      const one = await getJson<EventListBody>(api.url, "/v2/events?limit=1");
      assert.equal(one.events.length, 1);
      assert.equal(
        one.events[0].id,
        (await getJson<EventListBody>(api.url, "/v2/events")).events.at(-1)!.id,
      );
    },
  );

  await t.step("a bad ?after= is a 400 that says what it must be", async () => {
    const body = await getJson<{ error: string }>(api.url, "/v2/events?after=-1", 400);
    assert.match(body.error, /"after" must be a whole number/);
  });

  await t.step("GET /v2/metrics/history moves while a writer runs", async () => {
    await using client = await StreamClient.changes(api.url, "feed");
    let id = 0;
    const history = await poll(async () => {
      await sql(db, `INSERT INTO items VALUES (${++id}, 'x')`);
      while (client.pending > 0) client.ack((await client.next()).nextlsn);
      const body = await getJson<MetricHistoryBody>(api.url, "/v2/metrics/history");
      const moving = body.samples.some((s) =>
        (s.streams.feed?.changesPerSecond ?? 0) > 0 && s.streams.feed.latencyP99Ms !== null
      );
      return moving ? body : undefined;
    }, "a history sample with changes per second and latency for feed");
    assert.equal(history.intervalSeconds, 0.2);
    const sample = history.samples.findLast((s) => s.streams.feed?.changesPerSecond > 0)!;
    assert.ok(sample.streams.feed.bytesPerSecond > 0);
    assert.equal(typeof sample.streams.feed.lagBytes, "number");
    assert.ok(sample.streams.feed.latencyP50Ms! <= sample.streams.feed.latencyP99Ms!);
  });

  await t.step(
    "a stream's consumer shows since when, and how old its oldest unacknowledged frame is",
    async () => {
      assert.equal((await streamState(api.url, "feed")).consumer, undefined);
      await using client = await StreamClient.changes(api.url, "feed");
      await sql(db, "INSERT INTO items VALUES (1000, 'unacknowledged')");
      const frame = await client.next();
      const waiting = await poll(async () => {
        const state = await streamState(api.url, "feed");
        return (state.consumer?.unackedSeconds ?? 0) > 0.2 ? state : undefined;
      }, "unackedSeconds to grow while the frame is not acknowledged");
      assert.ok(Date.parse(waiting.consumer!.connectedAt) <= Date.now());
      client.ack(frame.nextlsn);
      await poll(
        async () => (await streamState(api.url, "feed")).consumer?.unackedSeconds === 0,
        "unackedSeconds to be 0 once the frame is acknowledged",
      );
    },
  );

  await t.step(
    "PATCH /v2/streams/{name} changes the limits, and the WAL guard acts on them",
    async () => {
      const bad = await patch(api.url, "feed", { limits: { maxIdleSeconds: -1 } });
      assert.equal(bad.status, 400);
      assert.match(bad.body.error, /"maxIdleSeconds" must be a whole number of seconds/);
      const unknown = await patch(api.url, "nosuch", { limits: { maxIdleSeconds: 1 } });
      assert.equal(unknown.status, 404);
      assert.match(unknown.body.error, /Cannot change stream: stream "nosuch" does not exist/);

      const before = await streamState(api.url, "feed");
      const changed = await patch(api.url, "feed", { limits: { maxIdleSeconds: 1 } });
      assert.equal(changed.status, 200, JSON.stringify(changed.body));
      const body = changed.body as StreamStateBody;
      assert.deepEqual(body.limits, { maxLagBytes: before.limits.maxLagBytes, maxIdleSeconds: 1 });
      assert.deepEqual((await streamState(api.url, "feed")).limits, body.limits);
      await poll(
        async () => (await streamState(api.url, "feed")).health === "invalidated",
        "the WAL guard to invalidate the stream idle past its new 1 s limit",
      );
    },
  );

  await t.step("/v2/status shows a v1 slot's lag, retained WAL and health", async () => {
    const slotName = await init(api.url);
    await sql(db, "INSERT INTO items VALUES (2000, 'lag')");
    const report = await getJson<HealthReport>(api.url, "/v2/status");
    const slot = report.slots!.find((s) => s.slotName === slotName)!;
    assert.equal(slot.v1, true);
    assert.equal(slot.health, "ok");
    assert.ok(slot.lagBytes! > 0, `lagBytes ${slot.lagBytes}`);
    assert.ok(slot.retainedBytes! >= slot.lagBytes!);
    const stream = report.slots!.find((s) => s.slotName !== slotName && s.ownedByPgdeltastream);
    assert.equal(stream?.v1, false);
  });
});
