import assert from "node:assert/strict";
import pg from "pg";
import type { DatabaseConfig } from "../src/config.ts";
import type { BackfillBody, Change, StreamStateBody, TransactionFrame } from "../src/protocol.ts";
import { parseLsn } from "../src/lsn.ts";
import { deadline, poll } from "./support/deadline.ts";
import { createStream, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";
import { seededRandom, testSeed } from "./support/random.ts";
import { Replica, type ReplicaRow } from "./support/replica.ts";

const ROWS = 30_000;

const SETUP = `
CREATE TABLE items(id int PRIMARY KEY, region text NOT NULL, qty int NOT NULL);
INSERT INTO items SELECT g, CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g % 100
  FROM generate_series(1, ${ROWS}) g;
CREATE TABLE orders(id int PRIMARY KEY, total int NOT NULL);
INSERT INTO orders SELECT g, g FROM generate_series(1, ${ROWS}) g;
CREATE TABLE sentinel(id int PRIMARY KEY);
CREATE TABLE nokey(v int);
`;

/** `PATCH /v2/streams/{name}` with `body`: its status and JSON body. */
async function patch(
  base: URL,
  name: string,
  body: unknown,
): Promise<{ status: number; body: StreamStateBody & { error?: string } }> {
  const response = await fetch(new URL(`/v2/streams/${name}`, base), {
    method: "PATCH",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

/** The rows of `query`, keyed as a consumer's copy holds them. */
async function rowsOf(db: DatabaseConfig, query: string): Promise<Map<string, ReplicaRow>> {
  const rows = await sql<ReplicaRow>(db, query);
  return new Map(rows.map((r) => [JSON.stringify(r.id), r]));
}

/** Asserts a copy equals the table's rows, reporting a few differences. */
function assertSameRows(
  actual: Map<string, ReplicaRow>,
  wanted: Map<string, ReplicaRow>,
  what: string,
): void {
  const missing = [...wanted.keys()].filter((k) => !actual.has(k));
  const extra = [...actual.keys()].filter((k) => !wanted.has(k));
  const differing = [...wanted.keys()].filter((k) =>
    actual.has(k) && JSON.stringify(actual.get(k)) !== JSON.stringify(wanted.get(k))
  );
  assert.deepEqual(
    { missing: missing.slice(0, 5), extra: extra.slice(0, 5), differing: differing.slice(0, 5) },
    { missing: [], extra: [], differing: [] },
    `${what}: copy has ${actual.size} rows, table ${wanted.size}: ${missing.length} missing, ` +
      `${extra.length} extra, ${differing.length} differing`,
  );
}

/**
 * Writes to items and orders until stopped, each statement its own
 * transaction: inserts, updates (of the region, in and out of either filter,
 * and of the key) and deletes across the key space.
 */
function writer(db: DatabaseConfig, seed: number): { stop: () => Promise<number> } {
  const random = seededRandom(seed);
  const client = new pg.Client(db);
  client.on("error", () => {});
  let stopped = false;
  let next = ROWS * 2;
  const running = (async () => {
    await client.connect();
    let count = 0;
    try {
      while (!stopped) {
        const id = 1 + Math.floor(random() * ROWS * 1.2);
        const pick = random();
        if (pick < 0.2) {
          await client.query("INSERT INTO items VALUES ($1, $2, 7)", [
            next++,
            ["eu", "us", "apac"][Math.floor(random() * 3)],
          ]);
        } else if (pick < 0.35) {
          await client.query(
            "UPDATE items SET region = CASE region WHEN 'eu' THEN 'us' WHEN 'us' THEN 'apac' ELSE 'eu' END WHERE id = $1",
            [id],
          );
        } else if (pick < 0.45) {
          await client.query("UPDATE items SET id = $2 WHERE id = $1", [id, next++]);
        } else if (pick < 0.5) {
          await client.query("DELETE FROM items WHERE id = $1", [id]);
        } else if (pick < 0.65) {
          await client.query("INSERT INTO orders VALUES ($1, 1)", [next++]);
        } else if (pick < 0.8) {
          await client.query("UPDATE orders SET total = total + 1 WHERE id = $1", [id]);
        } else if (pick < 0.9) {
          await client.query("UPDATE orders SET id = $2 WHERE id = $1", [id, next++]);
        } else {
          await client.query("DELETE FROM orders WHERE id = $1", [id]);
        }
        count++;
      }
    } finally {
      await client.end();
    }
    return count;
  })();
  // Its failure is the test's only if it is stopped: a test that failed first has its own error.
  running.catch(() => {});
  return {
    stop: async () => {
      stopped = true;
      return await deadline(running, "the writer to stop");
    },
  };
}

/** Reads `client`'s frames into `replica` (acking each unless told not to) until `until` holds of one. */
async function consume(
  client: StreamClient,
  replica: Replica,
  until: (frame: TransactionFrame<Change>) => boolean,
  what: string,
  options: { ack?: boolean; seen?: TransactionFrame<Change>[] } = {},
): Promise<void> {
  await deadline(
    (async () => {
      for (;;) {
        const frame = await client.nextV2();
        replica.apply(frame);
        options.seen?.push(frame);
        if (options.ack !== false) client.ack(frame.nextlsn);
        if (until(frame)) return;
      }
    })(),
    what,
    180_000,
  );
}

/** Waits until the stream's slot confirmed `lsn` (the consumer's last ack reached PostgreSQL). */
async function confirmed(db: DatabaseConfig, stream: string, lsn: string): Promise<void> {
  await poll(async () => {
    const [row] = await sql<{ done: boolean }>(
      db,
      `SELECT s.confirmed_flush_lsn >= $2::pg_lsn AS done FROM pgdeltastream.streams t
         JOIN pg_replication_slots s ON s.slot_name = t.slot_name WHERE t.name = $1`,
      [stream, lsn],
    );
    return row?.done === true || undefined;
  }, `the slot of stream ${stream} to confirm ${lsn}`);
}

let sentinel = 0;
/** Inserts a sentinel row and reads `client` until it arrives. */
async function catchUp(
  db: DatabaseConfig,
  client: StreamClient,
  replica: Replica,
  options: { ack?: boolean; seen?: TransactionFrame<Change>[] } = {},
): Promise<void> {
  const id = ++sentinel;
  await sql(db, "INSERT INTO sentinel VALUES ($1)", [id]);
  await consume(
    client,
    replica,
    (f) =>
      f.change.some((c) =>
        c.kind === "insert" && c.table === "sentinel" && c.columnvalues?.[0] === id
      ),
    `the sentinel ${id}`,
    options,
  );
}

Deno.test("a PATCH that adds a table and widens another's filter, under a writer: one replace backfill each, nothing of the added table before its started, and the copies equal the tables", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "grow",
    tables: [
      { table: "items", columns: ["id", "region", "qty"], where: [["region", "=", "eu"]] },
      "sentinel",
    ],
    initial: "backfill",
  });
  await using client = await StreamClient.changes(api.url, "grow");
  const replica = new Replica();
  const seen: TransactionFrame<Change>[] = [];
  const first = (await (await fetch(new URL("/v2/streams/grow/backfills", api.url))).json())
    .backfills.find((b: BackfillBody) => b.table === "public.items");
  const seed = testSeed();
  const writes = writer(db, seed);
  // The first copy arrives under the first definition.
  await consume(
    client,
    replica,
    (f) => f.change.some((c) => c.kind === "backfill" && c.id === first.id && c.state === "done"),
    "the first backfill's done",
    { seen },
  );
  const changed = await patch(api.url, "grow", {
    tables: [
      { table: "items", columns: ["id", "region", "qty"], where: [["region", "in", ["eu", "us"]]] },
      "sentinel",
      "orders",
    ],
  });
  assert.equal(changed.status, 200, JSON.stringify(changed.body));
  assert.deepEqual(changed.body.tables.map((t) => `${t.schema}.${t.table}`), [
    "public.items",
    "public.sentinel",
    "public.orders",
  ]);
  const started = changed.body.backfills;
  assert.deepEqual(started.map((b) => [b.table, b.mode]), [
    ["public.items", "replace"],
    ["public.orders", "replace"],
  ]);
  const dones: string[] = [];
  await consume(
    client,
    replica,
    (f) => {
      for (const c of f.change) {
        if (c.kind === "backfill" && c.state === "done" && started.some((b) => b.id === c.id)) {
          dones.push(c.id!);
        }
      }
      return dones.length === started.length;
    },
    "both backfills of the change to be done",
    { seen },
  );
  assert.deepEqual(dones, started.map((b) => b.id), "they run in the definition's table order");
  const statements = await writes.stop();
  await catchUp(db, client, replica, { seen });
  assertSameRows(
    replica.table("public.items"),
    await rowsOf(db, "SELECT id, region, qty FROM items WHERE region IN ('eu', 'us') ORDER BY id"),
    `items (seed ${seed})`,
  );
  assertSameRows(
    replica.table("public.orders"),
    await rowsOf(db, "SELECT id, total FROM orders ORDER BY id"),
    `orders (seed ${seed})`,
  );
  // The change took effect in one frame, which started both backfills (and cancelled the first,
  // if its done was not yet stored as acknowledged); no change of orders before.
  const at = seen.findIndex((f) =>
    f.change.some((c) => c.kind === "backfill" && c.id === started[0].id)
  );
  const switchFrame = seen[at];
  assert.deepEqual(
    switchFrame.change.filter((c) =>
      !(c.kind === "backfill" && c.state === "cancelled" && c.id === first.id)
    )
      .map((c) => c.kind === "backfill" ? [c.state, c.id] : [c.kind]),
    started.map((b) => ["started", b.id]),
    "the change's frame carries the backfills' started",
  );
  assert.ok(
    seen.slice(0, at).every((f) => f.change.every((c) => !("table" in c) || c.table !== "orders")),
    "no change of orders before its started",
  );
  assert.ok(
    seen.slice(0, at).every((f) =>
      f.change.every((c) =>
        c.kind !== "insert" || c.table !== "items" || c.columnvalues?.[1] === "eu"
      )
    ),
    "no insert of a us item under the first definition",
  );
  assert.ok(
    seen.slice(at).some((f) => f.change.some((c) => c.kind === "insert" && c.table === "orders")),
    "orders' inserts come after the change",
  );
  assert.ok(statements > 50, `the writer ran ${statements} statements`);
  const state = await (await fetch(new URL("/v2/streams/grow", api.url))).json();
  assert.equal(state.tables.length, 3, "GET shows the new definition");
});

Deno.test("a PATCH that removes a table sends removed; a consumer that reconnects before acking gets the changes before it under the old definition", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, { name: "shrink", tables: ["orders", "sentinel"] });
  const before = await (async () => {
    await using client = await StreamClient.changes(api.url, "shrink");
    const replica = new Replica();
    await catchUp(db, client, replica);
    return replica;
  })();
  assert.equal(before.removed.length, 0);
  await sql(db, "INSERT INTO orders VALUES (-1, 10)");
  const changed = await patch(api.url, "shrink", { tables: ["sentinel"] });
  assert.equal(changed.status, 200, JSON.stringify(changed.body));
  assert.deepEqual(changed.body.backfills, []);
  // The shared publication still carries every table's updates and deletes: the decoder drops them.
  await sql(db, "INSERT INTO orders VALUES (-2, 20)");
  await sql(db, "UPDATE orders SET total = 21 WHERE id = -1");
  await sql(db, "DELETE FROM orders WHERE id = 1");
  // Read, without acking, twice: the second connection starts where the first did.
  for (const round of ["first", "second"]) {
    await using client = await StreamClient.changes(api.url, "shrink");
    const replica = new Replica();
    const seen: TransactionFrame<Change>[] = [];
    await catchUp(db, client, replica, { ack: false, seen });
    const kinds = seen.map((f) =>
      f.change.map((c) => c.kind === "backfill" ? `${c.state} ${c.table}` : `${c.kind} ${c.table}`)
        .join(",")
    );
    assert.deepEqual(
      kinds.slice(0, 2),
      ["schema orders,insert orders", "removed orders"],
      `${round} connection: the insert before the change, under the old definition, then removed`,
    );
    assert.ok(
      seen.slice(2).every((f) => f.change.every((c) => !("table" in c) || c.table !== "orders")),
      `${round} connection: nothing of orders after removed`,
    );
    assert.deepEqual(replica.removed, ["public.orders"]);
  }
  // Once acknowledged, the change is behind the consumer, and another may be made.
  await using client = await StreamClient.changes(api.url, "shrink");
  const seen: TransactionFrame<Change>[] = [];
  await catchUp(db, client, new Replica(), { seen });
  await confirmed(db, "shrink", seen.at(-1)!.nextlsn);
  const again = await patch(api.url, "shrink", { tables: ["sentinel", "orders"], backfill: false });
  assert.equal(again.status, 200, JSON.stringify(again.body));
  assert.deepEqual(again.body.backfills, [], "backfill: false starts none");
});

Deno.test("PATCH refuses what cannot be changed with a clear 4xx, and the stream keeps its definition", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "fixed",
    tables: ["orders"],
    operations: ["insert", "update"],
  });
  const refusals: [unknown, number, RegExp][] = [
    [{}, 400, /at least one of "tables", "operations" and "limits"/],
    [{ tables: ["missing"] }, 404, /missing/],
    [
      { tables: ["orders", "nokey"] },
      400,
      /nokey has neither a primary key nor a replica identity/,
    ],
    [{ tables: [{ table: "orders", where: [["total", "like", "x"]] }] }, 400, /like/],
    [{ tables: ["orders"], backfill: "no" }, 400, /"backfill" must be true/],
  ];
  for (const [body, status, message] of refusals) {
    const answer = await patch(api.url, "fixed", body);
    assert.equal(answer.status, status, JSON.stringify(body));
    assert.match(answer.body.error!, message, JSON.stringify(body));
  }
  assert.equal((await patch(api.url, "nope", { tables: ["orders"] })).status, 404);
  // Dropping a kind of change needs no new replication; nokey without a backfill is fine.
  const narrowed = await patch(api.url, "fixed", {
    tables: ["orders", "nokey"],
    operations: ["insert"],
    backfill: false,
  });
  assert.equal(narrowed.status, 200, JSON.stringify(narrowed.body));
  assert.deepEqual(narrowed.body.operations, ["insert"]);
  // No consumer has read that change yet: a second one waits for it.
  const second = await patch(api.url, "fixed", { tables: ["orders", "nokey", "sentinel"] });
  assert.equal(second.status, 409);
  assert.match(second.body.error!, /has not reached its consumer yet/);
  const [{ slot_name: slot }] = await sql<{ slot_name: string }>(
    db,
    "SELECT slot_name FROM pgdeltastream.streams WHERE name = 'fixed'",
  );
  assert.deepEqual(
    (await sql<{ tablename: string }>(
      db,
      "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
      [`${slot}_i`],
    )).map((r) => r.tablename),
    ["nokey", "orders"],
    "a refused change leaves the publication as it was",
  );
  const state = await (await fetch(new URL("/v2/streams/fixed", api.url))).json();
  assert.deepEqual(
    state.tables.map((t: { schema: string; table: string }) => `${t.schema}.${t.table}`),
    [
      "public.orders",
      "public.nokey",
    ],
  );
  // After the change, updates are not carried.
  await using client = await StreamClient.changes(api.url, "fixed");
  await sql(db, "UPDATE orders SET total = 0 WHERE id = 1");
  await sql(db, "INSERT INTO nokey VALUES (5)");
  const replica = new Replica("v");
  const seen: TransactionFrame<Change>[] = [];
  await consume(
    client,
    replica,
    (f) => f.change.some((c) => c.kind === "insert" && c.table === "nokey"),
    "the insert into nokey",
    { seen },
  );
  assert.ok(
    seen.every((f) => f.change.every((c) => c.kind !== "update")),
    "no update after the change dropped them",
  );
  await confirmed(db, "fixed", seen.at(-1)!.nextlsn);
  const third = await patch(api.url, "fixed", { tables: ["orders"], backfill: false });
  assert.equal(third.status, 200, "once acknowledged, the next change goes through");
  // The same change again (a retry) changes nothing, and is answered as such.
  const retried = await patch(api.url, "fixed", { tables: ["orders"], backfill: false });
  assert.equal(retried.status, 200, JSON.stringify(retried.body));
  assert.deepEqual(retried.body.backfills, []);
  assert.deepEqual(retried.body.tables.map((t) => t.table), ["orders"]);
});

Deno.test("a PATCH waits for the transactions open as it began, so a row one of them wrote to an added table is not lost", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  const { slotName } = await createStream(api.url, { name: "open", tables: ["sentinel"] });
  await using client = await StreamClient.changes(api.url, "open");
  const replica = new Replica();
  await catchUp(db, client, replica);
  // A transaction writes to orders before the change, and commits only after it began.
  const open = new pg.Client(db);
  open.on("error", () => {});
  await open.connect();
  try {
    await open.query("BEGIN");
    await open.query("INSERT INTO orders VALUES (-7, 70)");
    let answered = false;
    const changing = patch(api.url, "open", { tables: ["sentinel", "orders"] }).finally(() =>
      answered = true
    );
    await poll(async () => {
      const rows = await sql(
        db,
        "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND tablename = 'orders'",
        [`${slotName}_i`],
      );
      return rows.length > 0 || undefined;
    }, "the stream's publication to take orders in");
    // Whatever a decoder has done by now, the change has not been recorded: it waits.
    await catchUp(db, client, replica);
    assert.equal(answered, false, "the change waits for the open transaction");
    const meanwhile = await patch(api.url, "open", { tables: ["sentinel", "items"] });
    assert.equal(meanwhile.status, 409, JSON.stringify(meanwhile.body));
    assert.match(meanwhile.body.error!, /another change of it is under way/);
    await open.query("COMMIT");
    const changed = await deadline(changing, "the change to be answered");
    assert.equal(changed.status, 200, JSON.stringify(changed.body));
    const [orders] = changed.body.backfills;
    await consume(
      client,
      replica,
      (f) =>
        f.change.some((c) => c.kind === "backfill" && c.id === orders.id && c.state === "done"),
      "the backfill of orders to be done",
    );
  } finally {
    await open.end();
  }
  await catchUp(db, client, replica);
  assertSameRows(
    replica.table("public.orders"),
    await rowsOf(db, "SELECT id, total FROM orders ORDER BY id"),
    "orders",
  );
  assert.equal(replica.table("public.orders").get("-7")?.total, 70);
});

Deno.test("a PATCH behind a large transaction: its backfills wait until the decoder carries the change, and the copy is whole", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, { name: "behind", tables: ["sentinel"] });
  await using client = await StreamClient.changes(api.url, "behind");
  const replica = new Replica();
  await catchUp(db, client, replica);
  // The decoder has this to get through before it reaches the change: seconds, in which the
  // backfill runner is woken by the change and polls the store.
  await sql(db, "INSERT INTO sentinel SELECT g FROM generate_series(1000000, 1150000) g");
  const changed = await patch(api.url, "behind", { tables: ["sentinel", "orders"] });
  assert.equal(changed.status, 200, JSON.stringify(changed.body));
  const [orders] = changed.body.backfills;
  const seen: TransactionFrame<Change>[] = [];
  await consume(
    client,
    replica,
    (f) =>
      f.change.some((c) => c.kind === "backfill" && c.id === orders.id && c.state !== "started"),
    "the backfill of orders to end",
    { seen },
  );
  const ends = seen.flatMap((f) =>
    f.change.filter((c) => c.kind === "backfill" && c.id === orders.id).map((c) =>
      c.kind === "backfill" ? c.state : ""
    )
  );
  assert.deepEqual(ends, ["started", "done"], "the backfill of orders started once, and is done");
  await catchUp(db, client, replica);
  assertSameRows(
    replica.table("public.orders"),
    await rowsOf(db, "SELECT id, total FROM orders ORDER BY id"),
    "orders",
  );
  assert.equal(replica.table("public.sentinel").size, 150_001 + 2);
});

Deno.test("a PATCH that adds updates, deletes and truncates to an insert-only stream: its walsender starts again at the change, the consumer keeps its connection, and a reconnect before the ack gets the same", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, {
    name: "more",
    tables: ["orders", "sentinel"],
    operations: ["insert"],
  });
  /** What each change of `seen` is, with the id of its row. */
  const described = (seen: TransactionFrame<Change>[]) =>
    seen.flatMap((f) =>
      f.change.map((c) => {
        if ("oldkeys" in c && c.kind === "delete") {
          return `delete ${c.table} ${c.oldkeys?.keyvalues[0]}`;
        }
        if (c.kind === "insert" || c.kind === "update") {
          return `${c.kind} ${c.table} ${c.columnvalues?.[0]}`;
        }
        return `${c.kind} ${"table" in c ? c.table : ""}`;
      })
    ).filter((d) => !/^(insert sentinel|schema|read|backfill)/.test(d));
  const wanted = ["insert orders -5", "update orders 2", "delete orders 3", "truncate sentinel"];
  {
    await using client = await StreamClient.changes(api.url, "more");
    const replica = new Replica();
    await catchUp(db, client, replica);
    // Before the change: not carried.
    await sql(db, "UPDATE orders SET total = -1 WHERE id = 1");
    // With a table added (and backfilled), the change has a frame: one this consumer never acks.
    const changed = await patch(api.url, "more", {
      tables: ["orders", "sentinel", "items"],
      operations: ["insert", "update", "delete", "truncate"],
    });
    assert.equal(changed.status, 200, JSON.stringify(changed.body));
    assert.deepEqual(changed.body.operations, ["insert", "update", "delete", "truncate"]);
    await sql(db, "INSERT INTO orders VALUES (-5, 5)");
    await sql(db, "UPDATE orders SET total = -2 WHERE id = 2");
    await sql(db, "DELETE FROM orders WHERE id = 3");
    await sql(db, "TRUNCATE sentinel");
    const seen: TransactionFrame<Change>[] = [];
    await consume(
      client,
      replica,
      (f) => f.change.some((c) => c.kind === "truncate"),
      "the truncate of sentinel, on the connection open through the change",
      { seen, ack: false },
    );
    assert.deepEqual(described(seen), wanted, "the first connection");
    const full = seen.filter((f) => !f.partial).map((f) => parseLsn(f.nextlsn));
    assert.ok(
      full.every((lsn, i) => i === 0 || lsn > full[i - 1]),
      "no frame twice, nor out of order, across the walsender's restart",
    );
    const [{ behind }] = await sql<{ behind: boolean }>(
      db,
      `SELECT s.confirmed_flush_lsn <= (t.switch->>'lsn')::pg_lsn AS behind
         FROM pgdeltastream.streams t JOIN pg_replication_slots s ON s.slot_name = t.slot_name
        WHERE t.name = 'more'`,
    );
    assert.equal(behind, true, "the slot is still before the change");
  }
  // Not acknowledged: the next connection starts before the change, with the walsender of the
  // old definition, and is started again at the change as the first was.
  await using client = await StreamClient.changes(api.url, "more");
  const seen: TransactionFrame<Change>[] = [];
  await consume(
    client,
    new Replica(),
    (f) => f.change.some((c) => c.kind === "truncate"),
    "the truncate of sentinel, on a connection after a reconnect",
    { seen },
  );
  assert.deepEqual(described(seen), wanted, "the connection after a reconnect");
  await confirmed(db, "more", seen.at(-1)!.nextlsn);
  await sql(db, "UPDATE orders SET total = -4 WHERE id = 4");
  const after: TransactionFrame<Change>[] = [];
  await consume(
    client,
    new Replica(),
    (f) => f.change.some((c) => c.kind === "update"),
    "the update after the change was acknowledged",
    { seen: after },
  );
  assert.deepEqual(described(after), ["update orders 4"]);
});
