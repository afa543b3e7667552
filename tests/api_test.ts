import assert from "node:assert/strict";
import { CloseCode } from "../src/protocol.ts";
import type { ReleaseDetail } from "../src/snapshots/snapshot_store.ts";
import {
  init,
  postJson,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  WEBSOCKET_HANDSHAKE,
} from "./support/harness.ts";

const SETUP = `
CREATE TABLE test_table(id serial primary key, name text);
INSERT INTO test_table(name) VALUES ('abc'), ('abc1'), ('abc2'), ('val1'), ('val2');
CREATE TABLE typed(id bigint primary key, n numeric, ok boolean, f float8, by bytea, j jsonb);
INSERT INTO typed VALUES (9007199254740993, 123456789012345678901234567890.123456789, true, 'NaN', '\\xdead', '{"a": 1}');
CREATE TABLE "Mixed Case"("Id" int primary key, "Some Col" text);
INSERT INTO "Mixed Case" VALUES (1, 'mc');
CREATE SCHEMA other;
CREATE TABLE other.t(id int primary key, v text);
INSERT INTO other.t VALUES (1, 'other schema');
CREATE TABLE nokey(a int, b text);
INSERT INTO nokey VALUES (2, 'b'), (1, 'a');
`;

Deno.test("the seed's README, step by step, and the errors around it", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db, { slotBusyTimeoutSeconds: 5 });
  const url = (path: string) => new URL(path, api.url);
  const snapshot = (body: unknown) => postJson(url("/v1/snapshot/data"), body);

  await t.step("init returns a delta_<word><number> slot, by GET and by POST", async () => {
    const get = await (await fetch(url("/v1/init"))).json();
    assert.match(get.slotName, /^delta_[a-z]+[0-9]+$/);
    const post = await (await fetch(url("/v1/init"), { method: "POST" })).json();
    assert.match(post.slotName, /^delta_[a-z]+[0-9]+$/);
    assert.notEqual(post.slotName, get.slotName);
  });

  await t.step("init drops the slot it created before, and never another tool's", async () => {
    await sql(db, "SELECT pg_create_logical_replication_slot('delta_foreign1', 'pgoutput')");
    const first = await init(api.url);
    const second = await init(api.url);
    const slots =
      (await sql<{ slot_name: string }>(db, "SELECT slot_name FROM pg_replication_slots")).map((
        r,
      ) => r.slot_name);
    assert.ok(slots.includes(second));
    assert.ok(!slots.includes(first));
    assert.ok(slots.includes("delta_foreign1"));
    await sql(db, "SELECT pg_drop_replication_slot('delta_foreign1')");
  });

  await t.step("snapshot returns the seed's example rows, as of the slot's snapshot", async () => {
    const slotName = await init(api.url);
    await sql(db, "INSERT INTO test_table(name) VALUES ('after init')");
    const page = await snapshot({
      slotName,
      table: "test_table",
      offset: 0,
      limit: 5,
      order_by: { column: "id", order: "ASC" },
    });
    assert.equal(page.status, 200);
    assert.deepEqual(JSON.parse(page.text), [
      { id: 1, name: "abc" },
      { id: 2, name: "abc1" },
      { id: 3, name: "abc2" },
      { id: 4, name: "val1" },
      { id: 5, name: "val2" },
    ]);
    const all = await snapshot({ slotName, table: "test_table", offset: 0, limit: 100 });
    assert.equal(
      JSON.parse(all.text).length,
      5,
      "the row inserted after init is not in the snapshot",
    );
  });

  await t.step("snapshot pages by offset and limit, in either order", async () => {
    const slotName = await init(api.url);
    const page = await snapshot({
      slotName,
      table: "test_table",
      offset: 1,
      limit: 2,
      order_by: { column: "id", order: "desc" },
    });
    assert.deepEqual(JSON.parse(page.text).map((r: { id: number }) => r.id), [5, 4]);
    const keyless = await snapshot({ slotName, table: "nokey", offset: 0, limit: 10 });
    assert.deepEqual(JSON.parse(keyless.text), [{ a: 2, b: "b" }, { a: 1, b: "a" }]);
  });

  await t.step(
    "snapshot writes values as wal2json does: numbers verbatim, booleans, strings",
    async () => {
      const slotName = await init(api.url);
      const page = await snapshot({ slotName, table: "typed", limit: 1 });
      assert.equal(
        page.text,
        '[{"id":9007199254740993,"n":123456789012345678901234567890.123456789,"ok":true,"f":null,"by":"dead","j":"{\\"a\\": 1}"}]',
      );
    },
  );

  await t.step("snapshot accepts schema.table and quoted or exact mixed-case names", async () => {
    const slotName = await init(api.url);
    for (const table of ["other.t", '"other"."t"']) {
      const page = await snapshot({ slotName, table });
      assert.deepEqual(JSON.parse(page.text), [{ id: 1, v: "other schema" }], table);
    }
    for (const table of ['"Mixed Case"', "Mixed Case", 'public."Mixed Case"']) {
      const page = await snapshot({ slotName, table, order_by: { column: "Some Col" } });
      assert.deepEqual(JSON.parse(page.text), [{ Id: 1, "Some Col": "mc" }], table);
    }
  });

  await t.step(
    "stream sends the seed's insert frame, and the snapshot stays readable after streaming starts",
    async () => {
      const slotName = await init(api.url);
      await using client = await StreamClient.open(api.url, slotName);
      const [{ id }] = await sql(
        db,
        "INSERT INTO test_table (name) VALUES ('newval1') RETURNING id",
      );
      const frame = await client.next();
      assert.match(frame.nextlsn, /^[0-9A-F]+\/[0-9A-F]+$/);
      assert.deepEqual(frame.change, [{
        kind: "insert",
        schema: "public",
        table: "test_table",
        columnnames: ["id", "name"],
        columntypes: ["integer", "text"],
        columnvalues: [id, "newval1"],
      }]);
      const page = await snapshot({ slotName, table: "test_table", limit: 100 });
      assert.equal(page.status, 200);
      assert.equal(JSON.parse(page.text).length, 6);
    },
  );

  await t.step(
    "a reconnect resumes after the last ack and re-sends what was not acknowledged",
    async () => {
      const slotName = await init(api.url);
      const first = await StreamClient.open(api.url, slotName);
      for (const name of ["r1", "r2", "r3"]) {
        await sql(
          db,
          "INSERT INTO test_table(name) VALUES ($1)",
          [name],
        );
      }
      const frames = [await first.next(), await first.next(), await first.next()];
      // Ack, then close at once: the server flushes the ack to PostgreSQL before it lets the slot go.
      first.ack(frames[0].nextlsn);
      await first[Symbol.asyncDispose]();

      // Reconnect at once: PostgreSQL may still hold the old walsender for a moment.
      await using second = await StreamClient.open(api.url, slotName);
      const resent = [await second.next(), await second.next()];
      assert.deepEqual(resent, frames.slice(1));
    },
  );

  await t.step(
    "a second stream on a slot being streamed gets 409, and the first keeps working",
    async () => {
      const slotName = await init(api.url);
      await using first = await StreamClient.open(api.url, slotName);
      const refused = await fetch(url(`/v1/lr/stream?slotName=${slotName}`), {
        headers: WEBSOCKET_HANDSHAKE,
      });
      assert.equal(refused.status, 409);
      assert.match((await refused.json()).error, /already being streamed/);
      await sql(db, "INSERT INTO test_table(name) VALUES ('still flowing')");
      assert.deepEqual((await first.next()).change[0].columnvalues?.slice(1), ["still flowing"]);
    },
  );

  await t.step("an invalid ack closes the socket with 4400 and a reason", async () => {
    const slotName = await init(api.url);
    for (const bad of ["not json", '{"lsn": 5}', '{"lsn": "zz/1"}', '{"lsn": "FF/0"}']) {
      await using client = await StreamClient.open(api.url, slotName);
      client.socket.send(bad);
      const closed = await client.closedWithin();
      assert.equal(closed.code, CloseCode.InvalidAck, bad);
      assert.match(closed.reason, /invalid ack/, bad);
    }
  });

  await t.step("bad requests get JSON errors with 4xx statuses", async () => {
    const slotName = await init(api.url);
    const cases: [unknown, number, RegExp][] = [
      ["{not json", 400, /not valid JSON/],
      [[], 400, /JSON object/],
      [{ table: "test_table" }, 400, /slotName/],
      [{ slotName, table: 5 }, 400, /table/],
      [{ slotName, table: "test_table", limit: -1 }, 400, /limit/],
      [{ slotName, table: "test_table", offset: 1.5 }, 400, /offset/],
      [
        { slotName, table: "test_table", order_by: { column: "id", order: "sideways" } },
        400,
        /order/,
      ],
      [{ slotName, table: "test_table", extra: 1 }, 400, /unknown field/],
      [
        { slotName: "delta_nosuch1", table: "test_table" },
        404,
        /slot "delta_nosuch1" does not exist/,
      ],
      [{ slotName, table: "no_such_table" }, 404, /table "no_such_table" does not exist/],
      [{ slotName, table: "a.b.c.d" }, 404, /does not exist/],
      [
        { slotName, table: "test_table", order_by: { column: "nope" } },
        400,
        /column "nope" does not exist/,
      ],
      [{ slotName, table: "typed", order_by: { column: "j" } }, 200, /./],
      [{ slotName, table: "test_table; DROP TABLE test_table" }, 404, /does not exist/],
      [
        { slotName, table: "test_table", order_by: { column: "id; DROP TABLE test_table" } },
        400,
        /does not exist/,
      ],
    ];
    for (const [body, status, message] of cases) {
      const response = await snapshot(body);
      assert.equal(response.status, status, `${JSON.stringify(body)} → ${response.text}`);
      if (status !== 200) assert.match(JSON.parse(response.text).error, message);
    }
    // The snapshot still works after all that, and no injection reached the database.
    assert.equal((await snapshot({ slotName, table: "test_table", limit: 1 })).status, 200);
    assert.equal(
      (await sql(db, "SELECT to_regclass('test_table') IS NOT NULL AS present"))[0].present,
      true,
    );
  });

  await t.step("unknown paths, wrong methods and bad stream requests get JSON errors", async () => {
    const checks: [string, RequestInit, number][] = [
      ["/v2/init", {}, 404],
      ["/nowhere", {}, 404],
      ["/v1/snapshot/data", { method: "GET" }, 405],
      ["/v1/init", { method: "DELETE" }, 405],
      ["/v1/lr/stream", {}, 400],
      ["/v1/lr/stream?slotName=delta_x1", {}, 426],
      ["/v1/lr/stream?slotName=bad%20name", { headers: { upgrade: "websocket" } }, 400],
    ];
    for (const [path, request, status] of checks) {
      const response = await fetch(url(path), request);
      assert.equal(response.status, status, path);
      assert.equal(typeof (await response.json()).error, "string");
    }
    const missing = await fetch(url("/v1/lr/stream?slotName=delta_nosuch1"), {
      headers: WEBSOCKET_HANDSHAKE,
    });
    assert.equal(missing.status, 404);
    assert.match((await missing.json()).error, /slot "delta_nosuch1" does not exist/);
  });

  await t.step(
    "keyset paging with after walks the table page by page, in either order",
    async () => {
      const slotName = await init(api.url);
      const walk = async (order: "ASC" | "DESC") => {
        const ids: number[] = [];
        let after: number | undefined;
        for (;;) {
          const page = await snapshot({
            slotName,
            table: "test_table",
            limit: 2,
            after,
            order_by: { column: "id", order },
          });
          assert.equal(page.status, 200, page.text);
          const rows = JSON.parse(page.text) as { id: number }[];
          if (rows.length === 0) return ids;
          ids.push(...rows.map((r) => r.id));
          after = rows.at(-1)!.id;
        }
      };
      const ascending = await walk("ASC");
      assert.ok(ascending.length >= 5);
      assert.deepEqual(ascending, [...ascending].sort((a, b) => a - b));
      assert.deepEqual(await walk("DESC"), [...ascending].reverse());
      const keyless = await snapshot({ slotName, table: "nokey", after: 1 });
      assert.equal(keyless.status, 400);
      assert.match(JSON.parse(keyless.text).error, /needs one sort column/);
      const both = await snapshot({ slotName, table: "test_table", after: 1, offset: 2 });
      assert.equal(both.status, 400);
    },
  );

  await t.step("export streams the whole table as NDJSON, as of the snapshot", async () => {
    const slotName = await init(api.url);
    await sql(db, "INSERT INTO test_table(name) VALUES ('after this init')");
    const exported = await postJson(url("/v1/snapshot/export"), { slotName, table: "test_table" });
    assert.equal(exported.status, 200);
    const lines = exported.text.trimEnd().split("\n").map((line) => JSON.parse(line));
    const page = await snapshot({ slotName, table: "test_table", limit: 1000 });
    assert.deepEqual(lines, JSON.parse(page.text));
    assert.ok(!lines.some((row) => row.name === "after this init"));
    const missing = await postJson(url("/v1/snapshot/export"), { slotName, table: "nope" });
    assert.equal(missing.status, 404);
    for (const field of [{ limit: 5 }, { offset: 1 }, { after: 3 }, { extra: true }]) {
      const refused = await postJson(url("/v1/snapshot/export"), {
        slotName,
        table: "test_table",
        ...field,
      });
      assert.equal(refused.status, 400, JSON.stringify(field));
      assert.match(
        JSON.parse(refused.text).error,
        /export streams the whole table|unknown field/,
        JSON.stringify(field),
      );
    }
    // The snapshot is still usable after an export (its cursor was closed).
    assert.equal((await snapshot({ slotName, table: "test_table", limit: 1 })).status, 200);
  });

  await t.step("a slot's snapshot answers 410 once its time-to-live has passed", async () => {
    await using shortLived = await startApi(db, { snapshotTtlSeconds: 1 });
    const slotName = await init(shortLived.url);
    const released = new Promise<ReleaseDetail>((resolve) =>
      shortLived.app.snapshots.addEventListener(
        "release",
        (e) => resolve((e as CustomEvent<ReleaseDetail>).detail),
        { once: true },
      )
    );
    assert.match((await released).reason, /time-to-live/);
    const page = await postJson(new URL("/v1/snapshot/data", shortLived.url), {
      slotName,
      table: "test_table",
    });
    assert.equal(page.status, 410);
    assert.match(JSON.parse(page.text).error, /expired after its time-to-live of 1 s.*\/v1\/init/);
  });
});
