import assert from "node:assert/strict";
import {
  connectStream,
  jsonParser,
  type RowChange,
  snapshotThenStream,
  StreamClosedError,
  type StreamStatus,
  type Transaction,
} from "../client/mod.ts";
import { fallbackParser } from "../client/exact_json.ts";
import { CloseCode } from "../src/protocol.ts";
import { deadline, poll } from "./support/deadline.ts";
import {
  authOn,
  createStream,
  deleteAt,
  sql,
  startApi,
  startPostgres,
  waitForSql,
} from "./support/harness.ts";

const BIG = "9223372036854775807";
const NUMERIC = "12345678901234567890.123456789012345678901";
const JSON_TEXT = `{"a":${BIG},"b":[${NUMERIC},-1.5e3,"9007199254740993",true,null],"c":"x\\"1"}`;

Deno.test("exact numbers: string and bigint modes keep what JSON.parse rounds, with or without source text", () => {
  assert.notEqual(String(JSON.parse(JSON_TEXT).a), BIG); // the problem
  for (const parse of [jsonParser("string"), fallbackParser("string")]) {
    assert.deepEqual(parse(JSON_TEXT), {
      a: BIG,
      b: [NUMERIC, "-1.5e3", "9007199254740993", true, null],
      c: 'x"1',
    });
  }
  for (const parse of [jsonParser("bigint"), fallbackParser("bigint")]) {
    const value = parse(JSON_TEXT) as { a: bigint; b: unknown[] };
    assert.equal(value.a, BigInt(BIG));
    assert.equal(value.b[0], NUMERIC);
  }
});

/** Waits until the slot's confirmed position is at least `lsn`. */
function confirmedAtLeast(db: Parameters<typeof sql>[0], slot: string, lsn: string) {
  return waitForSql(
    db,
    "SELECT confirmed_flush_lsn >= $2::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = $1",
    [slot, lsn],
  );
}

Deno.test("client library against a real server", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE accounts(id int8 primary key, balance numeric, region text);
     INSERT INTO accounts SELECT g, g * 10, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END
       FROM generate_series(1, 2500) g;
     INSERT INTO accounts VALUES (${BIG}, ${NUMERIC}, 'eu')`,
  );
  // Frames of at most ~1 KB: any transaction of more than a few rows arrives in partial chunks.
  await using api = await startApi(db, { slotBusyTimeoutSeconds: 5, frameChunkBytes: 1024 });
  const url = api.url.href;

  await t.step("snapshot then stream: an exact in-memory replica of a filtered table", async () => {
    await createStream(api.url, {
      name: "eu-accounts",
      tables: [{ table: "accounts", where: [["region", "=", "eu"]] }],
    });
    const replica = new Map<string, unknown[]>();
    const stream = await snapshotThenStream({
      url,
      stream: "eu-accounts",
      numbers: "string",
      pageSize: 500,
      onRows: (_table, rows) => {
        for (const row of rows) replica.set(row.id as string, [row.balance, row.region]);
      },
    });
    assert.equal(replica.size, 1251);
    assert.deepEqual(replica.get(BIG), [NUMERIC, "eu"]);
    await sql(
      db,
      `BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id <= 300;
       DELETE FROM accounts WHERE id BETWEEN 301 AND 310; INSERT INTO accounts VALUES (5000, 1, 'eu');
       UPDATE accounts SET balance = ${NUMERIC} + 1 WHERE id = ${BIG}; COMMIT`,
    );
    let sizes: number[] = [];
    for await (const tx of stream) {
      sizes.push(tx.changes.length);
      for (const change of tx.changes) {
        if (change.kind === "insert" || change.kind === "update") {
          const row = change as RowChange;
          const at = (c: string) => row.columnvalues![row.columnnames!.indexOf(c)];
          replica.set(at("id") as string, [at("balance"), at("region")]);
        } else if (change.kind === "delete") {
          replica.delete((change as RowChange).oldkeys!.keyvalues[0] as string);
        }
      }
      break;
    }
    // One transaction, assembled from its partial chunks (the frames are at most ~1 KB).
    assert.equal(sizes.length, 1);
    assert.ok(sizes[0] > 150, `${sizes[0]} changes`);
    const rows = await sql<{ id: string; balance: string; region: string }>(
      db,
      "SELECT id::text, balance::text, region FROM accounts WHERE region = 'eu'",
    );
    assert.deepEqual(
      new Map(rows.map((r) => [r.id, [r.balance, r.region]])),
      replica,
      "the replica equals the table's filtered rows",
    );
    await stream.close();
    sizes = [];
  });

  await t.step("an acknowledgement is sent only after the handler resolved", async () => {
    await createStream(api.url, { name: "acks", tables: ["accounts"] });
    const { slot_name: slot } = (await sql<{ slot_name: string }>(
      db,
      "SELECT slot_name FROM pgdeltastream.streams WHERE name = 'acks'",
    ))[0];
    await using stream = connectStream({ url, stream: "acks" });
    await sql(db, "INSERT INTO accounts VALUES (7001, 1, 'eu')");
    await sql(db, "INSERT INTO accounts VALUES (7002, 1, 'eu')");
    const release = Promise.withResolvers<void>();
    const seen: Transaction[] = [];
    const running = stream.run(async (tx) => {
      seen.push(tx);
      if (seen.length === 1) await release.promise;
      if (seen.length === 2) await stream.close();
    });
    await poll(() => seen.length === 1, "the handler to get the first transaction");
    // While the handler has not resolved, PostgreSQL was told nothing about it.
    const [{ behind }] = await sql<{ behind: boolean }>(
      db,
      "SELECT confirmed_flush_lsn < $2::pg_lsn AS behind FROM pg_replication_slots WHERE slot_name = $1",
      [slot, seen[0].lsn],
    );
    assert.ok(behind, "the slot moved before the handler resolved");
    // The client's own record says the same, whatever the timing of an ack in flight.
    assert.notEqual(stream.acknowledged, seen[0].lsn, "acknowledged before the handler resolved");
    release.resolve();
    await deadline(running, "the handler to see both transactions");
    await confirmedAtLeast(db, slot, seen[0].lsn);
    assert.equal(stream.acknowledged, seen[0].lsn);
  });

  await t.step("reconnects when replication is lost, and nothing is lost or repeated", async () => {
    const statuses: StreamStatus[] = [];
    await using stream = connectStream({
      url,
      stream: "acks",
      numbers: "bigint",
      reconnect: { initialDelayMs: 20 },
      onStatus: (s) => statuses.push(s),
    });
    const ids: bigint[] = [];
    const writer = (async () => {
      for (let i = 8000; i < 8040; i++) {
        await sql(db, "INSERT INTO accounts VALUES ($1, 1, 'us')", [i]);
        if (i === 8015) {
          await sql(
            db,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name LIKE 'pgds_acks_%' AND active_pid IS NOT NULL",
          );
        }
      }
    })();
    for await (const tx of stream) {
      for (const c of tx.changes) {
        if (c.kind === "insert") ids.push((c as RowChange).columnvalues![0] as bigint);
      }
      if (ids.at(-1) === 8039n) break;
    }
    await writer;
    // The last test closed while 7002's handler ran, so it was not acknowledged and comes again;
    // after that every row once, in order, across the reconnect.
    assert.deepEqual(ids, [7002n, ...Array.from({ length: 40 }, (_, i) => BigInt(8000 + i))]);
    assert.ok(
      statuses.some((s) => s.state === "reconnecting" && s.code === CloseCode.TryAgainLater),
      JSON.stringify(statuses),
    );
  });

  await t.step(
    "the bundled client works unchanged in Node 20+, exact numbers included",
    async () => {
      // Node 20 has no JSON.parse source text: this runs the client's fallback exact parser too.
      const script = `
      import { connectStream } from ${
        JSON.stringify(new URL("../client/dist/pgdeltastream.js", import.meta.url).href)
      };
      const stream = connectStream({ url: process.argv[1], stream: "acks", numbers: "string" });
      for await (const tx of stream) {
        const row = tx.changes.find((c) => c.kind === "insert" && c.columnvalues[0] === "${BIG}");
        if (row) { console.log(JSON.stringify(row.columnvalues)); break; }
      }
      await stream.close();`;
      const node = new Deno.Command("node", {
        args: ["--experimental-websocket", "--input-type=module", "-e", script, url],
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      await sql(db, `DELETE FROM accounts WHERE id = ${BIG}`);
      await sql(db, `INSERT INTO accounts VALUES (${BIG}, ${NUMERIC}, 'eu')`);
      const { code, stdout, stderr } = await deadline(node.output(), "the Node consumer to finish");
      assert.equal(code, 0, new TextDecoder().decode(stderr));
      assert.deepEqual(JSON.parse(new TextDecoder().decode(stdout)), [BIG, NUMERIC, "eu"]);
    },
  );

  await t.step("a final close code ends the iteration with StreamClosedError", async () => {
    await using stream = connectStream({ url, stream: "acks", reconnect: { initialDelayMs: 20 } });
    const outcome = (async () => {
      for await (const _ of stream) { /* nothing comes */ }
    })().then(() => undefined, (error) => error);
    // The stream is connected.
    await waitForSql(
      db,
      "SELECT count(*) = 1 AS ok FROM pg_replication_slots WHERE slot_name LIKE 'pgds_acks_%' AND active",
    );
    assert.equal(await deleteAt(api.url, "/v2/streams/acks"), 204);
    const error = await deadline(outcome, "the iteration to end");
    assert.ok(error instanceof StreamClosedError, String(error));
    assert.equal(error.code, CloseCode.SlotDropped);
  });

  await t.step(
    "a close during the first transaction's handler acknowledges nothing",
    async () => {
      await createStream(api.url, { name: "first-tx", tables: ["accounts"] });
      const [{ slot }] = await sql<{ slot: string }>(
        db,
        "SELECT slot_name AS slot FROM pgdeltastream.streams WHERE name = 'first-tx'",
      );
      const stream = connectStream({ url, stream: "first-tx" });
      await sql(db, "INSERT INTO accounts VALUES (7101, 1, 'eu')");
      let lsn: string | undefined;
      await stream.run(async (tx) => {
        lsn = tx.lsn;
        await stream.close(); // the application stops before it handled its first transaction
      });
      assert.equal(stream.acknowledged, undefined, "the client acknowledged what it never handled");
      // Once its walsender is gone, the slot shows every acknowledgement that reached PostgreSQL.
      await waitForSql(
        db,
        "SELECT NOT active AS ok FROM pg_replication_slots WHERE slot_name = $1",
        [
          slot,
        ],
      );
      const [{ behind }] = await sql<{ behind: boolean }>(
        db,
        "SELECT confirmed_flush_lsn < $2::pg_lsn AS behind FROM pg_replication_slots WHERE slot_name = $1",
        [slot, lsn],
      );
      assert.ok(behind, "the slot moved past a transaction whose handler never finished");
      assert.equal(await deleteAt(api.url, "/v2/streams/first-tx"), 204);
    },
  );

  await t.step(
    "by default, transactions handled together are acknowledged together, the last without another coming",
    async () => {
      await createStream(api.url, { name: "batched", tables: ["accounts"] });
      const [{ slot }] = await sql<{ slot: string }>(
        db,
        "SELECT slot_name AS slot FROM pgdeltastream.streams WHERE name = 'batched'",
      );
      const acks = async () => {
        const text = await (await fetch(new URL("/metrics", api.url))).text();
        return Number(/pgdeltastream_acks_total\{stream="batched"\} (\d+)/.exec(text)?.[1] ?? 0);
      };
      await using stream = connectStream({ url, stream: "batched" });
      // Thirty transactions committed before the consumer reads them: one burst of frames.
      await sql(
        db,
        "DO $$ BEGIN FOR i IN 7200..7229 LOOP INSERT INTO accounts VALUES (i, 1, 'eu'); COMMIT; END LOOP; END $$",
      );
      let last: string | undefined;
      let handled = 0;
      for await (const tx of stream) {
        last = tx.lsn;
        if (++handled === 30) break;
      }
      stream.acknowledge({ lsn: last!, changes: [] });
      // The last one is acknowledged without another transaction coming.
      await confirmedAtLeast(db, slot, last!);
      assert.ok(await acks() < 10, `${await acks()} acknowledgements for 30 transactions`);
      assert.equal(await deleteAt(api.url, "/v2/streams/batched"), 204);
    },
  );

  await t.step(
    "a stream that does not exist fails with the server's 404, not endless retries",
    async () => {
      const statuses: StreamStatus[] = [];
      const stream = connectStream({ url, stream: "nosuch", onStatus: (s) => statuses.push(s) });
      const error = await deadline(stream.next().then(() => undefined, (e) => e), "the refusal");
      assert.ok(error instanceof StreamClosedError);
      assert.equal(error.code, 404);
      const last = statuses.at(-1);
      assert.equal(last?.state, "closed");
      assert.equal(last?.state === "closed" ? last.code : undefined, 404, "onStatus says 404");
      assert.match(error.message, /does not exist/);
    },
  );
});

Deno.test("client library: a token function gives a fresh token after 4401, and the stream resumes", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE notes(id int primary key)");
  const ADMIN = "admin-" + crypto.randomUUID();
  await using api = await startApi(db, {
    slotBusyTimeoutSeconds: 5,
    auth: authOn(ADMIN),
  });
  const admin = { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" };
  const created = await fetch(new URL("/v2/streams", api.url), {
    method: "POST",
    headers: admin,
    body: JSON.stringify({ name: "notes", tables: ["notes"] }),
  });
  assert.equal(created.status, 201);
  await created.body?.cancel();
  let minted = 0;
  const token = async () => {
    minted++;
    const response = await fetch(new URL("/v2/streams/notes/tokens", api.url), {
      method: "POST",
      headers: admin,
      body: JSON.stringify({ ttlSeconds: 2 }),
    });
    return (await response.json()).token as string;
  };
  const statuses: StreamStatus[] = [];
  await using stream = connectStream({
    url: api.url,
    stream: "notes",
    token,
    onStatus: (s) => statuses.push(s),
  });
  const ids: number[] = [];
  await sql(db, "INSERT INTO notes VALUES (1)");
  const reading = (async () => {
    for await (const tx of stream) {
      for (const c of tx.changes) {
        if (c.kind === "insert") ids.push((c as RowChange).columnvalues![0] as number);
      }
      if (ids.length === 2) return;
    }
  })();
  await poll(() => ids.length === 1, "the first row");
  await poll(
    () => statuses.some((s) => s.state === "reconnecting" && s.code === CloseCode.TokenExpired),
    "the token to expire (4401)",
  );
  await sql(db, "INSERT INTO notes VALUES (2)");
  await deadline(reading, "the second row, on a fresh token");
  assert.deepEqual(ids, [1, 2]);
  assert.ok(minted >= 2);
});
