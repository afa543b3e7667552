import assert from "node:assert/strict";
import { CloseCode, MAX_CLIENT_MESSAGE_BYTES, MAX_REQUEST_BYTES } from "../src/protocol.ts";
import { init, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";

const INJECTIONS = [
  "x'; DROP TABLE canary; --",
  'x"; DROP TABLE canary; --',
  "canary; DROP TABLE canary",
  "1) OR (1=1",
  "pg_sleep(10)",
  "$1",
  "\\x00",
  "canary WHERE false UNION SELECT * FROM pg_authid",
];

Deno.test("hostile input gets a 4xx or a close code, never a 5xx, and never reaches SQL", async (t) => {
  // Every statement PostgreSQL runs is logged; request input may appear only as bound parameters.
  const log: string[] = [];
  await using postgres = await startPostgres({
    settings: { log_statement: "all" },
    onLog: (line) => log.push(line),
  });
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE canary(id int primary key); INSERT INTO canary VALUES (1);
                 CREATE TABLE "ünïcödé ✓"("ïd" int primary key, "wéird ""col""" text);
                 INSERT INTO "ünïcödé ✓" VALUES (1, 'ok')`,
  );
  await using api = await startApi(db);
  const slotName = await init(api.url);
  const snapshotUrl = new URL("/v1/snapshot/data", api.url);
  const post = (
    body: BodyInit,
    headers: Record<string, string> = { "content-type": "application/json" },
  ) => fetch(snapshotUrl, { method: "POST", headers, body });

  const expect4xx = async (response: Response, label: string) => {
    assert.ok(response.status >= 400 && response.status < 500, `${label}: ${response.status}`);
    assert.equal(typeof (await response.json()).error, "string", label);
  };

  await t.step("malformed, nested, oversized and mistyped bodies", async () => {
    const nested = "[".repeat(200_000) + "]".repeat(200_000);
    await expect4xx(await post(nested), "deeply nested array");
    await expect4xx(await post('{"a":'.repeat(100_000)), "deeply nested, unterminated object");
    await expect4xx(await post("x".repeat(MAX_REQUEST_BYTES + 1)), "body over 1 MiB");
    const chunked = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < 20; i++) controller.enqueue(new Uint8Array(128 * 1024).fill(32));
        controller.close();
      },
    });
    await expect4xx(await post(chunked), "chunked body over 1 MiB");
    await expect4xx(
      await post("{}", { "content-type": "application/x-www-form-urlencoded" }),
      "form body",
    );
    await expect4xx(await post("\u0000\uFFFF"), "binary junk");
    for (
      const body of [null, 1, "s", true, { slotName: [] }, { slotName, table: {} }, {
        slotName,
        table: "canary",
        limit: "5",
      }]
    ) {
      await expect4xx(await post(JSON.stringify(body)), JSON.stringify(body));
    }
  });

  await t.step("SQL injection attempts in every field", async () => {
    for (const evil of INJECTIONS) {
      const bodies = [
        { slotName: evil, table: "canary" },
        { slotName, table: evil },
        { slotName, table: "canary", order_by: { column: evil } },
        { slotName, table: "canary", order_by: { column: "id", order: evil } },
        { slotName, table: "canary", offset: evil },
        { slotName, table: "canary", limit: evil },
      ];
      for (const body of bodies) {
        await expect4xx(await post(JSON.stringify(body)), JSON.stringify(body));
      }
      const stream = await fetch(
        new URL(`/v1/lr/stream?slotName=${encodeURIComponent(evil)}`, api.url),
        {
          headers: { upgrade: "websocket" },
        },
      );
      await expect4xx(stream, `stream ${evil}`);
    }
    const [{ count }] = await sql<{ count: number }>(
      db,
      "SELECT count(*)::int AS count FROM canary",
    );
    assert.equal(count, 1, "the canary table is intact");
    const statements = log.filter((line) => /LOG:\s+(statement|execute [^:]*):/.test(line));
    assert.ok(statements.length > 50, "the statement log is being read");
    // ("$1" is every parameterised statement's own placeholder, so it proves nothing here.)
    for (const evil of INJECTIONS.filter((e) => e !== "$1")) {
      const leaked = statements.filter((line) => line.includes(evil));
      assert.deepEqual(leaked, [], `request input in SQL text: ${evil}`);
    }
  });

  await t.step("unicode and quoted identifiers are found exactly", async () => {
    const response = await post(
      JSON.stringify({ slotName, table: "ünïcödé ✓", order_by: { column: 'wéird "col"' } }),
    );
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), [{ "ïd": 1, 'wéird "col"': "ok" }]);
  });

  await t.step(
    "websocket garbage, binary and oversized messages close with their codes",
    async () => {
      const cases: [string | Uint8Array, number][] = [
        ["garbage{", CloseCode.InvalidAck],
        ['{"lsn": "0/1; DROP TABLE canary"}', CloseCode.InvalidAck],
        ['{"lsn": {"$gt": ""}}', CloseCode.InvalidAck],
        [new Uint8Array(16), CloseCode.UnsupportedData],
        ["x".repeat(MAX_CLIENT_MESSAGE_BYTES + 1), CloseCode.MessageTooBig],
      ];
      for (const [message, code] of cases) {
        await using client = await StreamClient.open(api.url, slotName);
        client.socket.send(message);
        assert.equal((await client.closedWithin()).code, code, String(message).slice(0, 40));
      }
    },
  );

  await t.step("an ack storm neither closes the stream nor stalls it", async () => {
    await using client = await StreamClient.open(api.url, slotName);
    await sql(db, "INSERT INTO canary VALUES (2)");
    const frame = await client.next();
    for (let i = 0; i < 20_000; i++) client.ack(frame.nextlsn);
    await sql(db, "INSERT INTO canary VALUES (3)");
    assert.deepEqual((await client.next()).change[0].columnvalues, [3]);
  });

  await t.step(
    "v2 stream definitions: injection in names, columns, operators and values, huge lists",
    async () => {
      await sql(db, "CREATE TABLE regions(id int primary key, region text, n int)");
      await sql(db, "INSERT INTO regions VALUES (1, 'eu', 1)");
      const create = (body: unknown) =>
        fetch(new URL("/v2/streams", api.url), {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify(body),
        });
      const before = log.length;
      let accepted = 0;
      for (const [i, evil] of INJECTIONS.entries()) {
        // Every injection into a definition is a 400, but a table name: that one is a missing
        // table (404, as any table that does not exist).
        const refused: [unknown, number][] = [
          [{ name: evil, tables: ["regions"] }, 400],
          [{ name: `s${i}`, tables: [evil] }, 404],
          [{ name: `s${i}`, tables: [{ table: "regions", columns: ["id", evil] }] }, 400],
          [{ name: `s${i}`, tables: [{ table: "regions", where: [[evil, "=", 1]] }] }, 400],
          [{ name: `s${i}`, tables: [{ table: "regions", where: [["region", evil, 1]] }] }, 400],
          [{ name: `s${i}`, tables: [{ table: "regions", where: [["n", "=", evil]] }] }, 400],
          [{ name: `s${i}`, tables: [{ table: "regions", where: [["n", "in", [1, evil]]] }] }, 400],
        ];
        for (const [body, status] of refused) {
          const response = await create(body);
          assert.equal(response.status, status, JSON.stringify(body));
          assert.equal(typeof (await response.json()).error, "string");
        }
        // As a value of a text column it is just a value: the stream is created, and its snapshot
        // and export read with it (bound, or quoted by PostgreSQL), finding no such row.
        const name = `evil-${i}`;
        const made = await create({
          name,
          tables: [{ table: "regions", where: [["region", "=", evil], ["region", "like", evil]] }],
        });
        assert.equal(made.status, 201, await made.clone().text());
        await made.body?.cancel();
        accepted++;
        for (const path of ["snapshot", "snapshot/export"]) {
          const read = await fetch(new URL(`/v2/streams/${name}/${path}`, api.url), {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ table: "regions" }),
          });
          assert.equal(read.status, 200, path);
          assert.match(await read.text(), /^(\[\]|)$/, `${path} with ${evil}`);
        }
        const deleted = await fetch(new URL(`/v2/streams/${name}`, api.url), { method: "DELETE" });
        assert.equal(deleted.status, 204);
      }
      assert.equal(accepted, INJECTIONS.length);
      const huge = [
        {
          name: "h",
          tables: [{
            table: "regions",
            where: [[
              "n",
              "in",
              Array.from({ length: 1001 }, (_, i) => i),
            ]],
          }],
        },
        {
          name: "h",
          tables: [{ table: "regions", where: Array.from({ length: 33 }, () => ["n", "=", 1]) }],
        },
        {
          name: "h",
          tables: [{ table: "regions", where: [["region", "=", "x".repeat(MAX_REQUEST_BYTES)]] }],
        },
        { name: "h", tables: Array.from({ length: 1001 }, () => "regions") },
      ];
      // Too many values or conditions: 400; a body over the size limit: 413.
      for (const [i, body] of huge.entries()) {
        const response = await create(body);
        assert.equal(response.status, i === 2 ? 413 : 400, JSON.stringify(body).slice(0, 80));
        assert.equal(typeof (await response.json()).error, "string");
      }
      // In the statement log, request input appears only as a bound parameter (never in a statement's
      // text) or as a literal PostgreSQL quoted itself (COPY, which takes no parameters).
      const statements = log.slice(before).filter((line) =>
        /LOG:\s+(statement|execute [^:]*):/.test(line)
      );
      let literals = 0;
      for (const evil of INJECTIONS.filter((e) => e !== "$1")) {
        const quoted = evil.includes("\\")
          ? `E'${evil.replaceAll("\\", "\\\\").replaceAll("'", "''")}'`
          : `'${evil.replaceAll("'", "''")}'`;
        const leaked = statements.filter((line) => line.replaceAll(quoted, "").includes(evil));
        assert.deepEqual(leaked, [], `request input in SQL text: ${evil}`);
        if (statements.some((line) => line.includes(quoted))) literals++;
      }
      assert.ok(literals > 0, "the exports' COPY carried their values as quoted literals");
      const [{ ids }] = await sql<{ ids: number[] }>(
        db,
        "SELECT array_agg(id ORDER BY id) AS ids FROM canary",
      );
      assert.deepEqual(ids, [1, 2, 3], "the canary table is intact");
    },
  );

  await t.step("the server still serves, and no request got a 5xx", async () => {
    const health = await fetch(new URL("/healthz", api.url));
    assert.equal(health.status, 200);
    await health.body?.cancel();
    const page = await post(JSON.stringify({ slotName, table: "canary" }));
    assert.equal(page.status, 200);
    await page.body?.cancel();
  });
});
