import assert from "node:assert/strict";
import { CloseCode, type StreamStateBody } from "../src/protocol.ts";
import {
  createStream,
  deleteAt,
  init,
  postJson,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  WEBSOCKET_HANDSHAKE,
} from "./support/harness.ts";

const SETUP = `
CREATE TABLE customers(id int primary key, email text, region text, deleted_at timestamptz, secret text);
INSERT INTO customers VALUES (1, 'a@x', 'eu', NULL, 's1'), (2, 'b@x', 'us', NULL, 's2'),
                             (3, 'c@x', 'eu', now(), 's3'), (4, 'd@x', 'eu', NULL, 's4');
CREATE TABLE orders(id int primary key, customer int, total numeric(10,2));
INSERT INTO orders VALUES (1, 1, 12.50), (2, 2, 3.00);
CREATE TABLE audit(id bigserial primary key, note text);
CREATE TABLE keyless(a int, b text);
CREATE SCHEMA other;
CREATE TABLE other."Mixed Case"("Id" int primary key, v text);
`;

const ORDERS_CACHE = {
  name: "orders-cache",
  tables: [
    "public.orders",
    {
      table: "public.customers",
      columns: ["id", "email", "region"],
      where: [["region", "=", "eu"], ["deleted_at", "is null"]],
    },
  ],
};

Deno.test("API v2: named streams, their snapshots, changes and tails", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db, { slotBusyTimeoutSeconds: 5 });
  const url = (path: string) => new URL(path, api.url);
  const get = async (path: string) => {
    const response = await fetch(url(path));
    return { status: response.status, body: await response.json() };
  };

  await t.step(
    "create: 201 with the definition normalized, its slot and its snapshot",
    async () => {
      const response = await postJson(url("/v2/streams"), ORDERS_CACHE);
      assert.equal(response.status, 201, response.text);
      const body = JSON.parse(response.text);
      assert.equal(body.name, "orders-cache");
      assert.match(body.slotName, /^pgds_orders_cache_[0-9a-f]{6}$/);
      assert.deepEqual(body.tables, [
        {
          schema: "public",
          table: "orders",
          columns: ["id", "customer", "total"],
          allColumns: true,
          key: ["id"],
          where: [],
        },
        {
          schema: "public",
          table: "customers",
          columns: ["id", "email", "region"],
          allColumns: false,
          key: ["id"],
          where: [["region", "=", "eu"], ["deleted_at", "is null"]],
        },
      ]);
      assert.deepEqual(body.operations, ["insert", "update", "delete", "truncate"]);
      assert.ok(Date.parse(body.snapshot.expiresAt) > Date.now());
      assert.ok(!Number.isNaN(Date.parse(body.createdAt)));
      const [{ slots }] = await sql<{ slots: number }>(
        db,
        "SELECT count(*)::int AS slots FROM pg_replication_slots WHERE slot_name = $1",
        [body.slotName],
      );
      assert.equal(slots, 1);
    },
  );

  await t.step(
    "create: bad definitions get 400, 404 or 409 saying what is wrong, and leave no slot",
    async () => {
      const cases: [unknown, number, RegExp][] = [
        [{ ...ORDERS_CACHE, name: "Bad Name" }, 400, /"name" must be 1 to 48/],
        [{ ...ORDERS_CACHE, name: "x".repeat(49) }, 400, /"name"/],
        [ORDERS_CACHE, 409, /a stream named "orders-cache" already exists/],
        [{ name: "s1", tables: [] }, 400, /"tables" must be a list/],
        [{ name: "s1", tables: ["no_such_table"] }, 404, /table "no_such_table" does not exist/],
        [{ name: "s1", tables: ["pg_catalog.pg_authid"] }, 404, /does not exist/],
        [{ name: "s1", tables: ["pgdeltastream.streams"] }, 404, /does not exist/],
        [{ name: "s1", tables: ["orders", "public.orders"] }, 400, /listed twice/],
        [
          { name: "s1", tables: [{ table: "orders", columns: ["id", "nope"] }] },
          400,
          /column "nope" does not exist in public\.orders/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", columns: ["total"] }] },
          400,
          /must include the replica identity.*missing: id/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", where: [["nope", "=", 1]] }] },
          400,
          /"tables\[0\]\.where\[0\]": column "nope" does not exist/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", where: [["customer", "=", "abc"]] }] },
          400,
          /invalid input syntax for type integer: "abc".*the column is integer/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", where: [["customer", "like", "1%"]] }] },
          400,
          /operator "like" is not supported on column "customer" of type integer/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", where: [["total", "is null", 1]] }] },
          400,
          /"is null" takes no value/,
        ],
        [
          { name: "s1", tables: [{ table: "orders", where: [["total", "between", 1]] }] },
          400,
          /"where" must be a list of at most 32 conditions/,
        ],
        [
          {
            name: "s1",
            tables: [{ table: "orders", where: Array.from({ length: 33 }, () => ["id", ">", 0]) }],
          },
          400,
          /at most 32 conditions/,
        ],
        [
          {
            name: "s1",
            tables: [{
              table: "orders",
              where: [["id", "in", Array.from({ length: 1001 }, (_, i) => i)]],
            }],
          },
          400,
          /"in" takes at most 1000 values/,
        ],
        [{ name: "s1", tables: ["orders"], operations: ["upsert"] }, 400, /"operations"/],
        [{ name: "s1", tables: ["orders"], extra: 1 }, 400, /unknown field "extra"/],
        [
          { name: "s1", tables: [{ table: "orders", colums: ["id"] }] },
          400,
          /unknown field "tables\[0\]\.colums"/,
        ],
      ];
      for (const [body, status, message] of cases) {
        const response = await postJson(url("/v2/streams"), body);
        assert.equal(
          response.status,
          status,
          `${JSON.stringify(body).slice(0, 120)} → ${response.text}`,
        );
        assert.match(JSON.parse(response.text).error, message);
      }
      const [{ slots }] = await sql<{ slots: number }>(
        db,
        "SELECT count(*)::int AS slots FROM pg_replication_slots",
      );
      assert.equal(slots, 1, "only orders-cache's slot");
      assert.equal((await get("/v2/streams/s1")).status, 404);
    },
  );

  await t.step("list and get: the definition and the state; unknown names 404", async () => {
    const listed = await get("/v2/streams");
    assert.equal(listed.status, 200);
    assert.deepEqual(listed.body.streams.map((s: StreamStateBody) => s.name), ["orders-cache"]);
    const { status, body } = await get("/v2/streams/orders-cache");
    assert.equal(status, 200);
    assert.equal(body.active, false);
    assert.match(body.confirmedLsn, /^[0-9A-F]+\/[0-9A-F]+$/);
    assert.equal(typeof body.lagBytes, "number");
    assert.equal(body.snapshotHeld, true);
    assert.equal(body.tails, 0);
    assert.equal((await get("/v2/streams/nope")).status, 404);
    assert.match((await get("/v2/streams/nope")).body.error, /stream "nope" does not exist/);
    assert.equal((await get("/v2/streams/Not%20A%20Name")).status, 400);
    for (const path of ["/v2/streams/nope/changes", "/v2/streams/nope/tail"]) {
      const upgrade = await fetch(url(path), { headers: WEBSOCKET_HANDSHAKE });
      assert.equal(upgrade.status, 404, `${path} of an unknown stream`);
      assert.match((await upgrade.json()).error, /stream "nope" does not exist/);
    }
  });

  await t.step("snapshot: only the stream's tables, columns and rows", async () => {
    const page = (body: unknown) => postJson(url("/v2/streams/orders-cache/snapshot"), body);
    const customers = await page({ table: "customers" });
    assert.equal(customers.status, 200, customers.text);
    assert.deepEqual(JSON.parse(customers.text), [
      { id: 1, email: "a@x", region: "eu" },
      { id: 4, email: "d@x", region: "eu" },
    ]);
    assert.deepEqual(JSON.parse((await page({ table: "public.orders" })).text), [
      { id: 1, customer: 1, total: 12.50 },
      { id: 2, customer: 2, total: 3.00 },
    ]);
    // Keyset and offset paging stay within the filter.
    assert.deepEqual(JSON.parse((await page({ table: "customers", after: 1, limit: 5 })).text), [
      { id: 4, email: "d@x", region: "eu" },
    ]);
    assert.deepEqual(JSON.parse((await page({ table: "customers", offset: 1 })).text), [
      { id: 4, email: "d@x", region: "eu" },
    ]);
    // A table outside the stream reads as missing, as one that does not exist.
    const outside = await page({ table: "audit" });
    assert.equal(outside.status, 404);
    assert.match(JSON.parse(outside.text).error, /table "audit" does not exist/);
    assert.equal((await page({ table: "customers", slotName: "x" })).status, 400);
    const exported = await postJson(url("/v2/streams/orders-cache/snapshot/export"), {
      table: "customers",
    });
    assert.equal(exported.status, 200);
    assert.deepEqual(
      exported.text.trimEnd().split("\n").map((l) => JSON.parse(l)).sort((a, b) => a.id - b.id),
      JSON.parse(customers.text),
    );
    assert.equal(
      (await postJson(url("/v2/streams/orders-cache/snapshot/export"), {
        table: "customers",
        limit: 1,
      }))
        .status,
      400,
    );
    assert.equal(
      (await postJson(url("/v2/streams/nope/snapshot"), { table: "orders" })).status,
      404,
    );
  });

  await t.step(
    "changes: only the stream's tables, columns, rows; one consumer; resume after the ack",
    async () => {
      const first = await StreamClient.changes(api.url, "orders-cache");
      await sql(
        db,
        `INSERT INTO customers VALUES (10, 'x@x', 'eu', NULL, 'secret'), (11, 'y@x', 'us', NULL, 'secret');
       INSERT INTO audit(note) VALUES ('not in the stream')`,
      );
      await sql(db, "INSERT INTO orders VALUES (3, 10, 1.10)");
      const frame = await first.nextV2();
      const rows = frame.change.filter((c) => c.kind !== "schema");
      assert.deepEqual(rows, [{
        kind: "insert",
        schema: "public",
        table: "customers",
        columnnames: ["id", "email", "region"],
        columntypes: ["integer", "text", "text"],
        columnvalues: [10, "x@x", "eu"],
      }]);
      assert.ok(
        !JSON.stringify(frame).includes("secret"),
        "a column the stream leaves out was sent",
      );
      const refused = await fetch(url("/v2/streams/orders-cache/changes"), {
        headers: WEBSOCKET_HANDSHAKE,
      });
      assert.equal(refused.status, 409);
      assert.match((await refused.json()).error, /stream "orders-cache" is already being streamed/);
      const second = await first.nextV2();
      first.ack(frame.nextlsn);
      await first[Symbol.asyncDispose]();
      await using again = await StreamClient.changes(api.url, "orders-cache");
      const resent = await again.nextV2();
      assert.equal(resent.nextlsn, second.nextlsn, "resumes after the last ack");
      assert.deepEqual(
        resent.change.filter((c) => c.kind !== "schema"),
        second.change.filter((c) => c.kind !== "schema"),
      );
      again.ack(resent.nextlsn);
      const state = await get("/v2/streams/orders-cache");
      assert.equal(state.body.active, true);
    },
  );

  await t.step(
    "tail: a read-only copy of what the consumer is sent; its acks are ignored",
    async () => {
      await using consumer = await StreamClient.changes(api.url, "orders-cache");
      await using tail = await StreamClient.connect(api.url, "/v2/streams/orders-cache/tail");
      await using tail2 = await StreamClient.connect(api.url, "/v2/streams/orders-cache/tail");
      const [{ lsn: before }] = await sql<{ lsn: string }>(
        db,
        "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name LIKE 'pgds_orders_cache%'",
      );
      await sql(db, "INSERT INTO orders VALUES (4, 1, 9.99)");
      const sent = await consumer.nextText();
      assert.equal(await tail.nextText(), sent);
      assert.equal(await tail2.nextText(), sent);
      tail.ack(JSON.parse(sent).nextlsn);
      await sql(db, "INSERT INTO orders VALUES (5, 1, 1.00)");
      const next = await consumer.nextText();
      assert.equal(await tail.nextText(), next);
      const [{ lsn: after }] = await sql<{ lsn: string }>(
        db,
        "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name LIKE 'pgds_orders_cache%'",
      );
      assert.equal(after, before, "a tail's ack moved the stream's position");
      consumer.ack(JSON.parse(next).nextlsn);
      assert.equal((await get("/v2/streams/orders-cache")).body.tails, 2);
    },
  );

  await t.step("v1 and v2 side by side: init drops only v1's slots", async () => {
    const slot = await init(api.url);
    await init(api.url);
    const slots =
      (await sql<{ slot_name: string }>(db, "SELECT slot_name FROM pg_replication_slots"))
        .map((r) => r.slot_name);
    assert.ok(!slots.includes(slot));
    assert.ok(
      slots.some((s) => s.startsWith("pgds_orders_cache_")),
      "init dropped a v2 stream's slot",
    );
    await using v1 = await StreamClient.open(api.url, await init(api.url));
    await using v2 = await StreamClient.changes(api.url, "orders-cache");
    await sql(db, "INSERT INTO orders VALUES (6, 1, 6.00)");
    assert.equal((await v1.next()).change[0].columnvalues?.[0], 6);
    assert.deepEqual(
      (await v2.nextV2()).change.flatMap((c) => c.kind === "insert" ? [c.columnvalues?.[0]] : []),
      [6],
    );
  });

  await t.step(
    "delete: closes the consumer and tails with 4000, drops the slot; then 404",
    async () => {
      const consumer = await StreamClient.changes(api.url, "orders-cache");
      const tail = await StreamClient.connect(api.url, "/v2/streams/orders-cache/tail");
      assert.equal(await deleteAt(api.url, "/v2/streams/orders-cache/snapshot"), 204);
      const released = await postJson(url("/v2/streams/orders-cache/snapshot"), {
        table: "orders",
      });
      assert.equal(released.status, 410);
      assert.match(JSON.parse(released.text).error, /released by DELETE/);
      assert.equal(await deleteAt(api.url, "/v2/streams/orders-cache"), 204);
      assert.equal((await consumer.closedWithin()).code, CloseCode.SlotDropped);
      assert.equal((await tail.closedWithin()).code, CloseCode.SlotDropped);
      assert.equal((await get("/v2/streams/orders-cache")).status, 404);
      assert.equal(await deleteAt(api.url, "/v2/streams/orders-cache"), 404);
      const [{ slots }] = await sql<{ slots: number }>(
        db,
        "SELECT count(*)::int AS slots FROM pg_replication_slots WHERE slot_name LIKE 'pgds_%'",
      );
      assert.equal(slots, 0);
      const publications = await sql(
        db,
        "SELECT pubname FROM pg_publication WHERE pubname LIKE 'pgds\\_orders\\_cache%'",
      );
      assert.deepEqual(publications, [], "the stream's insert publication is dropped with it");
    },
  );

  await t.step(
    "names are resolved as PostgreSQL resolves them; methods and paths are checked",
    async () => {
      const created = await createStream(api.url, {
        name: "mixed",
        tables: ['other."Mixed Case"'],
        operations: ["insert"],
      });
      assert.deepEqual((created.tables as { table: string }[]).map((t) => t.table), ["Mixed Case"]);
      const put = await fetch(url("/v2/streams/mixed"), { method: "PUT" });
      assert.equal(put.status, 405);
      assert.equal(put.headers.get("allow"), "GET, PATCH, DELETE");
      await put.body?.cancel();
      const keyless = await createStream(api.url, { name: "keyless", tables: ["keyless"] });
      assert.deepEqual((keyless.tables as { key: string[] }[])[0].key, []);
      for (const name of ["mixed", "keyless"]) {
        assert.equal(await deleteAt(api.url, `/v2/streams/${name}`), 204);
      }
    },
  );
});

Deno.test("a partitioned table streams its partitions' changes and reads its snapshot through the parent, filtered", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE measures(id int, region text, v int, PRIMARY KEY (id, region))
       PARTITION BY LIST (region);
     CREATE TABLE measures_eu PARTITION OF measures FOR VALUES IN ('eu');
     CREATE TABLE measures_us PARTITION OF measures FOR VALUES IN ('us');
     INSERT INTO measures VALUES (1, 'eu', 1), (2, 'us', 2)`,
  );
  await using api = await startApi(db);
  const created = await createStream(api.url, {
    name: "parted",
    tables: [{ table: "measures", where: [["region", "=", "eu"]] }],
  });
  assert.deepEqual((created.tables as { table: string }[]).map((t) => t.table), ["measures"]);
  const page = await postJson(new URL("/v2/streams/parted/snapshot", api.url), {
    table: "measures",
  });
  assert.equal(page.status, 200, page.text);
  assert.deepEqual(JSON.parse(page.text), [{ id: 1, region: "eu", v: 1 }]);
  await using consumer = await StreamClient.changes(api.url, "parted");
  await sql(db, "INSERT INTO measures VALUES (3, 'eu', 3), (4, 'us', 4)");
  const frame = await consumer.nextV2();
  const rows = frame.change.filter((c) => c.kind === "insert");
  assert.deepEqual(
    rows.map((c) => [c.table, (c as { columnvalues: unknown[] }).columnvalues]),
    [["measures_eu", [3, "eu", 3]]],
    "only the partition rows that pass the filter, named as wal2json names them",
  );
});

Deno.test("a stream's snapshot orders and seeks only by the columns the stream shows", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE people(id int primary key, email text, salary int);
     INSERT INTO people VALUES (1, 'a@x', 300), (2, 'b@x', 100), (3, 'c@x', 200);
     -- Keyed for replication by a visible unique column; its primary key is hidden.
     CREATE TABLE badges(secret int primary key, code text NOT NULL UNIQUE, label text);
     ALTER TABLE badges REPLICA IDENTITY USING INDEX badges_code_key;
     INSERT INTO badges VALUES (30, 'a', 'x'), (10, 'b', 'y'), (20, 'c', 'z')`,
  );
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "public-people",
    tables: [
      { table: "people", columns: ["id", "email"] },
      { table: "badges", columns: ["code", "label"] },
    ],
  });
  const snapshot = (body: unknown) =>
    postJson(new URL("/v2/streams/public-people/snapshot", api.url), body);
  const exported = (body: unknown) =>
    postJson(new URL("/v2/streams/public-people/snapshot/export", api.url), body);
  // Sorting by a hidden column would give its values away (sort, then page with "after" to search).
  for (
    const response of [
      await snapshot({ table: "people", order_by: { column: "salary" } }),
      await snapshot({ table: "people", order_by: { column: "salary" }, after: 150 }),
      await exported({ table: "people", order_by: { column: "salary" } }),
      await snapshot({ table: "people", order_by: { column: "nope" } }),
    ]
  ) {
    assert.equal(response.status, 400, response.text);
    assert.match(JSON.parse(response.text).error, /column "(salary|nope)" does not exist/);
  }
  // Visible columns sort and seek as before.
  const byEmail = await snapshot({ table: "people", order_by: { column: "email", order: "DESC" } });
  assert.deepEqual(JSON.parse(byEmail.text).map((r: { id: number }) => r.id), [3, 2, 1]);
  // Without order_by a hidden primary key is not the order either: the visible replica identity is,
  // and "after" seeks by it.
  const badges = await snapshot({ table: "badges" });
  assert.deepEqual(JSON.parse(badges.text), [
    { code: "a", label: "x" },
    { code: "b", label: "y" },
    { code: "c", label: "z" },
  ]);
  const afterA = await snapshot({ table: "badges", after: "a" });
  assert.equal(afterA.status, 200, afterA.text);
  assert.deepEqual(JSON.parse(afterA.text).map((r: { code: string }) => r.code), ["b", "c"]);
  const seekHidden = await snapshot({ table: "badges", after: 15 });
  assert.equal(seekHidden.status, 200, seekHidden.text);
  assert.deepEqual(
    JSON.parse(seekHidden.text).map((r: { code: string }) => r.code),
    ["a", "b", "c"],
    "compared with the codes, not the hidden keys",
  );
});
