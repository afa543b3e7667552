import assert from "node:assert/strict";
import pg from "pg";
import type { DatabaseConfig } from "../src/config.ts";
import type {
  BackfillBody,
  BackfillChange,
  Change,
  CreateStreamResponse,
  TransactionFrame,
} from "../src/protocol.ts";
import { deadline, poll } from "./support/deadline.ts";
import {
  captureLog,
  createStream,
  deleteAt,
  postJson,
  ServerProcess,
  sql,
  startApi,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";
import { seededRandom, testSeed } from "./support/random.ts";
import { Replica, type ReplicaRow } from "./support/replica.ts";
import { hasNats, NatsServer } from "./support/nats.ts";
import { PgConnection } from "../src/postgres/pg_connection.ts";

const ROWS = 200_000;

const SETUP = `
CREATE TABLE items(id int PRIMARY KEY, region text NOT NULL, qty int NOT NULL, note text);
INSERT INTO items SELECT g, CASE WHEN g % 3 = 0 THEN 'us' ELSE 'eu' END, g % 100, 'n' || g
  FROM generate_series(1, ${ROWS}) g;
CREATE TABLE sentinel(id int PRIMARY KEY);
CREATE TABLE nokey(v int);
`;

/** The stream of these tests: eu's items, three of their columns, and the sentinel. */
const STREAM = {
  tables: [
    { table: "items", columns: ["id", "region", "qty"], where: [["region", "=", "eu"]] },
    "sentinel",
    "nokey",
  ],
};

/** The rows of items the stream's filter passes, as a consumer's copy holds them. */
async function expected(db: DatabaseConfig): Promise<Map<string, ReplicaRow>> {
  const rows = await sql<ReplicaRow>(
    db,
    "SELECT id, region, qty FROM items WHERE region = 'eu' ORDER BY id",
  );
  return new Map(rows.map((r) => [JSON.stringify(r.id), r]));
}

/** Asserts the copy of items equals the table's rows (reporting a few differences, not 130k). */
function assertSameRows(actual: Map<string, ReplicaRow>, wanted: Map<string, ReplicaRow>): void {
  const missing = [...wanted.keys()].filter((k) => !actual.has(k));
  const extra = [...actual.keys()].filter((k) => !wanted.has(k));
  const differing = [...wanted.keys()].filter((k) =>
    actual.has(k) && JSON.stringify(actual.get(k)) !== JSON.stringify(wanted.get(k))
  );
  assert.deepEqual(
    { missing: missing.slice(0, 5), extra: extra.slice(0, 5), differing: differing.slice(0, 5) },
    { missing: [], extra: [], differing: [] },
    `copy has ${actual.size} rows, table ${wanted.size}: ${missing.length} missing, ` +
      `${extra.length} extra, ${differing.length} differing`,
  );
}

/**
 * Writes to items until stopped: inserts, updates of values, of the region
 * (in and out of the filter) and of the key, and deletes, across the key
 * space, each its own transaction. Resolves with how many statements ran.
 */
function writer(db: DatabaseConfig, seed: number): { stop: () => Promise<number> } {
  const random = seededRandom(seed);
  const client = new pg.Client(db);
  let stopped = false;
  let next = ROWS * 2;
  const running = (async () => {
    await client.connect();
    let count = 0;
    try {
      while (!stopped) {
        const id = 1 + Math.floor(random() * ROWS * 1.2);
        const pick = random();
        if (pick < 0.25) {
          await client.query("INSERT INTO items VALUES ($1, $2, 7, 'new') ON CONFLICT DO NOTHING", [
            next++,
            random() < 0.5 ? "eu" : "us",
          ]);
        } else if (pick < 0.5) {
          await client.query("UPDATE items SET qty = qty + 1000 WHERE id = $1", [id]);
        } else if (pick < 0.65) {
          await client.query(
            "UPDATE items SET region = CASE region WHEN 'eu' THEN 'us' ELSE 'eu' END WHERE id = $1",
            [id],
          );
        } else if (pick < 0.8) {
          await client.query("UPDATE items SET id = $2 WHERE id = $1", [id, next++]);
        } else {
          await client.query("DELETE FROM items WHERE id = $1", [id]);
        }
        count++;
      }
    } finally {
      await client.end();
    }
    return count;
  })();
  return {
    stop: async () => {
      stopped = true;
      return await deadline(running, "the writer to stop");
    },
  };
}

/** `POST /v2/streams/{name}/backfills`; the 202's body, or throws with the status. */
async function startBackfill(base: URL, stream: string, body: unknown): Promise<BackfillBody> {
  const response = await postJson(new URL(`/v2/streams/${stream}/backfills`, base), body);
  if (response.status !== 202) throw new Error(`backfill: ${response.status} ${response.text}`);
  return JSON.parse(response.text);
}

/** The stream's backfills as `GET …/backfills` lists them. */
async function listBackfills(base: URL, stream: string): Promise<BackfillBody[]> {
  const response = await fetch(new URL(`/v2/streams/${stream}/backfills`, base));
  assert.equal(response.status, 200);
  return (await response.json()).backfills;
}

/** What a consumer saw while it read: every frame's nextlsn and the backfill markers. */
interface Reading {
  frames: number;
  readFrames: number;
  lastLsn: string | undefined;
}

/**
 * Reads `client`'s frames into `replica`, acking each, until `until` is
 * true of a change (then resolves), or `limitFrames` read frames came.
 */
async function consume(
  client: StreamClient,
  replica: Replica,
  until: (change: Change) => boolean,
  what: string,
  options: { readFrames?: number; ack?: boolean } = {},
): Promise<Reading> {
  const reading: Reading = { frames: 0, readFrames: 0, lastLsn: undefined };
  return await deadline(
    (async () => {
      for (;;) {
        const frame: TransactionFrame<Change> = await client.nextV2();
        replica.apply(frame);
        reading.frames++;
        if (frame.change.some((c) => c.kind === "read")) reading.readFrames++;
        if (options.ack !== false) client.ack(frame.nextlsn);
        reading.lastLsn = frame.nextlsn;
        if (frame.change.some(until)) return reading;
        if (options.readFrames !== undefined && reading.readFrames >= options.readFrames) {
          return reading;
        }
      }
    })(),
    what,
    180_000,
  );
}

const isDone = (id: string) => (c: Change) =>
  c.kind === "backfill" && c.id === id && (c.state === "done" || c.state === "cancelled");

let sentinel = 0;
/** Inserts a sentinel row, and reads `client` until it arrives. */
async function catchUp(db: DatabaseConfig, client: StreamClient, replica: Replica): Promise<void> {
  const id = ++sentinel;
  await sql(db, "INSERT INTO sentinel VALUES ($1)", [id]);
  await consume(
    client,
    replica,
    (c) => c.kind === "insert" && c.table === "sentinel" && c.columnvalues?.[0] === id,
    `the sentinel ${id}`,
  );
}

Deno.test("a replace backfill while a writer changes the table leaves the consumer exactly the table's rows", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, { name: "bf", ...STREAM });
  await using client = await StreamClient.changes(api.url, "bf");
  const replica = new Replica();
  // The consumer's copy starts wrong: a row that is not in the table, which `replace` must drop.
  replica.table("public.items").set("-1", { id: -1, region: "eu", qty: 0 });
  const seed = testSeed();
  const writes = writer(db, seed);
  const backfill = await startBackfill(api.url, "bf", { table: "items", mode: "replace" });
  assert.equal(backfill.mode, "replace");
  assert.match(backfill.id, /^bf_[0-9a-f]{12}$/);
  const reading = await consume(client, replica, isDone(backfill.id), "the backfill's done");
  const statements = await writes.stop();
  await catchUp(db, client, replica);
  assertSameRows(replica.table("public.items"), await expected(db));
  const markers = replica.backfills.filter((b) => b.id === backfill.id);
  assert.deepEqual(markers.map((b) => b.state), ["started", "done"], `seed ${seed}`);
  assert.ok(reading.readFrames >= ROWS * 2 / 3 / 10_000, "rows came in chunks of at most 10,000");
  assert.ok(statements > 100, `the writer ran ${statements} statements during the backfill`);
  // Once its done is acknowledged, the backfill is listed done with the rows it sent.
  const done = await poll(async () => {
    const [b] = await listBackfills(api.url, "bf");
    return b.state === "done" ? b : undefined;
  }, "the backfill to be listed done");
  assert.equal(done.rowsDone, markers[1].rows);
  assert.ok(done.rowsEstimated! > 0 && done.startedAt !== null && done.finishedAt !== null);
});

Deno.test("an upsert backfill keeps the consumer's rows and refreshes them; a second one of the same table waits as one", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await sql(db, "DELETE FROM items WHERE id > 1000");
  await using api = await startApi(db);
  await createStream(api.url, { name: "up", ...STREAM });
  await using client = await StreamClient.changes(api.url, "up");
  const replica = new Replica();
  // A row of the consumer's own: upsert leaves what the table does not have.
  replica.table("public.items").set("-1", { id: -1, region: "eu", qty: 0 });
  const first = await startBackfill(api.url, "up", {
    table: "public.items",
    where: [["id", "<=", 500]],
  });
  assert.equal(first.mode, "upsert");
  await consume(client, replica, isDone(first.id), "the first backfill's done");
  const copy = replica.table("public.items");
  assert.equal(copy.get("-1")?.qty, 0, "upsert keeps the consumer's other rows");
  assert.equal(copy.size, 1 + 334, "the backfill's where narrowed the stream's filter");
  assert.ok([...copy.values()].every((r) => r.region === "eu"), "the stream's filter applied");
  assert.deepEqual(replica.backfills.map((b) => [b.state, b.mode ?? b.rows]), [
    ["started", "upsert"],
    ["done", 334],
  ]);
});

Deno.test("backfills refuse what cannot be done with a clear 4xx, and the server keeps serving", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await sql(db, "CREATE TABLE other(id int PRIMARY KEY)");
  await using api = await startApi(db);
  await createStream(api.url, { name: "bad", ...STREAM });
  const cases: [unknown, number, RegExp][] = [
    [{ table: "other" }, 400, /not one of stream "bad"'s tables/],
    [{ table: "nokey" }, 400, /neither a primary key nor a replica identity index/],
    [{ table: "missing" }, 404, /Cannot backfill: table "missing" does not exist/],
    [{ table: "items", mode: "merge" }, 400, /"mode" must be "upsert"/],
    [{ table: "items", where: [["nope", "=", 1]] }, 400, /nope/],
    [
      { table: "items", where: [["qty", "=", "x"]] },
      400,
      /"where\[0\]": invalid input syntax for type integer/,
    ],
    [{ table: "items", extra: 1 }, 400, /extra/],
    // The consumer drops its whole copy at a replace's started: a part of the table cannot refill it.
    [
      { table: "items", mode: "replace", where: [["qty", "<", 5]] },
      400,
      /a "replace" backfill copies the whole table, so it takes no "where"/,
    ],
    ["[", 400, /JSON/],
  ];
  for (const [body, status, message] of cases) {
    const response = await postJson(new URL("/v2/streams/bad/backfills", api.url), body);
    assert.equal(response.status, status, `${JSON.stringify(body)}: ${response.text}`);
    assert.match(JSON.parse(response.text).error, message, response.text);
  }
  const unknown = await postJson(new URL("/v2/streams/nobody/backfills", api.url), {
    table: "items",
  });
  assert.equal(unknown.status, 404);
  assert.equal(await deleteAt(api.url, "/v2/streams/bad/backfills/bf_000000000000"), 404);
  assert.deepEqual(await listBackfills(api.url, "bad"), []);
  // Still serving: a good one is queued (no consumer is connected, so it waits).
  const queued = await startBackfill(api.url, "bad", {
    table: "items",
    where: [["qty", "<", 5]],
  });
  assert.deepEqual([queued.state, queued.mode], ["queued", "upsert"]);
  // At most one backfill of a table waits: a second one joins it, which then does what both asked
  // (a replace of the whole table).
  const again = await startBackfill(api.url, "bad", { table: "items", mode: "replace" });
  assert.deepEqual([again.id, again.mode], [queued.id, "replace"]);
  const third = await startBackfill(api.url, "bad", { table: "items", where: [["qty", "<", 9]] });
  assert.deepEqual([third.id, third.mode], [queued.id, "replace"]);
  // Cancelling a queued one ends it at once; no frame is ever sent for it.
  const cancel = await fetch(new URL(`/v2/streams/bad/backfills/${queued.id}`, api.url), {
    method: "DELETE",
  });
  assert.equal(cancel.status, 202);
  assert.equal((await cancel.json()).state, "cancelled");
});

Deno.test("a backfill resumes after its last acknowledged chunk when the consumer reconnects, and through the server's kill -9", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  const replica = new Replica();
  const seed = testSeed();
  const writes = writer(db, seed);
  let server = await ServerProcess.spawn(db);
  try {
    await createStream(server.url, { name: "rs", ...STREAM });
    let client = await StreamClient.changes(server.url, "rs");
    const backfill = await startBackfill(server.url, "rs", { table: "items", mode: "replace" });
    // A reconnect after three chunks (each acknowledged): no new `started`, the next chunk follows.
    await consume(client, replica, isDone(backfill.id), "three chunks", { readFrames: 3 });
    await poll(async () => {
      const [b] = await listBackfills(server.url, "rs");
      return b.rowsDone > 0;
    }, "the acknowledged chunks' progress to be stored");
    await client[Symbol.asyncDispose]();
    client = await StreamClient.changes(server.url, "rs");
    await consume(client, replica, isDone(backfill.id), "three more chunks", { readFrames: 3 });
    // Then the server dies between chunks, and another takes over: the backfill goes on.
    assert.equal((await server.kill("SIGKILL")).signal, "SIGKILL");
    await client.closedWithin();
    server = await ServerProcess.spawn(db);
    client = await StreamClient.changes(server.url, "rs");
    await consume(client, replica, isDone(backfill.id), "the backfill's done after the restart");
    await writes.stop();
    await catchUp(db, client, replica);
    await client[Symbol.asyncDispose]();
    assertSameRows(replica.table("public.items"), await expected(db));
    const states = replica.backfills.map((b) => b.state);
    assert.deepEqual(states, ["started", "done"], `seed ${seed}: one started, resumed twice`);
  } finally {
    await writes.stop().catch(() => {});
    await server.kill("SIGKILL");
  }
});

Deno.test("ALTER TABLE during a backfill waits for one chunk at most; the backfill ends cancelled and a replace one starts with the new shape", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, { name: "alt", tables: ["items", "sentinel"] });
  await using client = await StreamClient.changes(api.url, "alt");
  const replica = new Replica();
  const backfill = await startBackfill(api.url, "alt", { table: "items", mode: "replace" });
  await consume(client, replica, isDone(backfill.id), "two chunks", { readFrames: 2 });
  // The statement waits behind no backfill transaction: chunks hold their lock only while read.
  await sql(db, "SET lock_timeout = '20s'; ALTER TABLE items ADD COLUMN extra int DEFAULT 5");
  const cancelled = await consume(client, replica, isDone(backfill.id), "the first backfill's end");
  assert.ok(cancelled.frames > 0);
  assert.equal(replica.backfills.at(-1)!.state, "cancelled");
  const next = await poll(async () => {
    const list = await listBackfills(api.url, "alt");
    return list.find((b) => b.id !== backfill.id);
  }, "a new backfill to replace the cancelled one");
  assert.equal(next.mode, "replace");
  await consume(client, replica, isDone(next.id), "the new backfill's done");
  await catchUp(db, client, replica);
  const copy = replica.table("public.items");
  assert.equal(copy.size, ROWS);
  assert.ok([...copy.values()].every((r) => r.extra === 5), "every row has the new column");
  const states = replica.backfills.map((b: BackfillChange) =>
    `${b.id === backfill.id ? 1 : 2} ${b.state}`
  );
  assert.deepEqual(states, ["1 started", "1 cancelled", "2 started", "2 done"]);
});

Deno.test("a transaction whose commit the log carries before a chunk's read can see it makes the chunk read again, not its old rows", async () => {
  await using postgres = await startPostgres({ settings: { synchronous_commit: "local" } });
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  await createStream(api.url, { name: "vis", ...STREAM });
  await using client = await StreamClient.changes(api.url, "vis");
  const replica = new Replica();
  // A synchronous standby that never answers: a commit that asks for it is written (and decoded)
  // but stays invisible to every other transaction until the wait is released.
  await sql(db, "ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
  await sql(db, "SELECT pg_reload_conf()");
  const waiting = new pg.Client(db);
  await waiting.connect();
  try {
    await waiting.query("BEGIN");
    await waiting.query("SET LOCAL synchronous_commit = on");
    await waiting.query("UPDATE items SET qty = 999 WHERE id = 5");
    const committing = waiting.query("COMMIT");
    await consume(
      client,
      replica,
      (c) => c.kind === "update" && c.columnvalues?.[0] === 5,
      "the invisible update's frame",
    );
    assert.equal((await sql(db, "SELECT qty FROM items WHERE id = 5"))[0].qty, 5, "not visible");
    const backfill = await startBackfill(api.url, "vis", { table: "items", mode: "replace" });
    await consume(
      client,
      replica,
      (c) => c.kind === "backfill" && c.state === "started",
      "the backfill's started",
    );
    await sql(db, "ALTER SYSTEM SET synchronous_standby_names = ''");
    await sql(db, "SELECT pg_reload_conf()");
    await deadline(committing, "the waiting commit to be released");
    await consume(client, replica, isDone(backfill.id), "the backfill's done");
    await catchUp(db, client, replica);
    assert.equal(replica.table("public.items").get("5")?.qty, 999, "the chunk's old row lost");
    assertSameRows(replica.table("public.items"), await expected(db));
  } finally {
    await waiting.end();
  }
});

Deno.test('initial: "backfill" holds no snapshot and gives the first consumer its copy in the socket', async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, SETUP);
  await using api = await startApi(db);
  // Refused at creation when a table cannot be backfilled, naming it; nothing is left behind.
  const refused = await postJson(new URL("/v2/streams", api.url), {
    name: "first",
    tables: ["items", "nokey"],
    initial: "backfill",
  });
  assert.equal(refused.status, 400, refused.text);
  assert.match(JSON.parse(refused.text).error, /public\.nokey has neither a primary key/);
  const bad = await postJson(new URL("/v2/streams", api.url), {
    name: "first",
    tables: ["items"],
    initial: "copy",
  });
  assert.equal(bad.status, 400);
  assert.match(
    JSON.parse(bad.text).error,
    /"initial" must be "snapshot" \(the default\) or "backfill"/,
  );
  const created = await createStream(api.url, {
    name: "first",
    tables: STREAM.tables.slice(0, 2),
    initial: "backfill",
  }) as unknown as CreateStreamResponse;
  assert.equal(created.initial, "backfill");
  assert.equal(created.snapshot, undefined);
  assert.deepEqual(created.backfills!.map((b) => b.table), ["public.items", "public.sentinel"]);
  const state = await (await fetch(new URL("/v2/streams/first", api.url))).json();
  assert.equal(state.snapshotHeld, false);
  assert.equal(state.backfills.length, 2);
  const held = await sql(
    db,
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()",
  );
  assert.equal(held[0].n, 0, "no transaction holds a snapshot for the stream");
  const seed = testSeed();
  const writes = writer(db, seed);
  await using client = await StreamClient.changes(api.url, "first");
  const replica = new Replica();
  for (const { id } of created.backfills!) {
    await consume(client, replica, isDone(id), `the initial backfill ${id}'s done`);
  }
  await writes.stop();
  await catchUp(db, client, replica);
  assertSameRows(replica.table("public.items"), await expected(db));
  assert.deepEqual(
    replica.backfills.map((b) => `${b.table} ${b.state}`),
    ["items started", "items done", "sentinel started", "sentinel done"],
    `seed ${seed}`,
  );
});

Deno.test("a consumer whose replication waited for a busy slot still gets its backfill", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE small(id int PRIMARY KEY, v text);
     INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 1000) g`,
  );
  using logs = captureLog();
  await using api = await startApi(db);
  const created = await createStream(api.url, {
    name: "held",
    tables: ["small"],
    initial: "backfill",
  }) as unknown as CreateStreamResponse;
  // Another connection streams the slot (a walsender not yet gone, say): the consumer's
  // replication waits for it to let go.
  const publications = await sql<{ pubname: string }>(db, "SELECT pubname FROM pg_publication");
  const holder = await PgConnection.connect(db, true);
  const held = holder.copyBoth(
    `START_REPLICATION SLOT "${created.slotName}" LOGICAL 0/0 (proto_version '1', publication_names '${
      publications.map((p) => p.pubname).join(",")
    }')`,
    () => {},
  );
  await deadline(held.started, "the other connection to stream the slot");
  const connecting = StreamClient.changes(api.url, "held");
  try {
    await poll(
      () => logs.events().some((e) => e.event === "replication.slot_busy") || undefined,
      "the consumer's replication to find the slot busy",
    );
  } finally {
    await holder.close();
  }
  await using client = await connecting;
  const replica = new Replica();
  await consume(client, replica, isDone(created.backfills![0].id), "the backfill's done");
  assert.equal(replica.table("public.small").size, 1000);
  assert.deepEqual(replica.backfills.map((b) => b.state), ["started", "done"]);
});

/** A copy of `parts` that reads its partitions' changes as the root's, as a consumer of it would. */
class PartsReplica extends Replica {
  override applyChange(change: Change): void {
    const partition = /^parts_(eu|us)$/.exec(change.table ?? "");
    if (partition === null) return super.applyChange(change);
    if (change.kind === "truncate") {
      // A partition's truncate empties that partition: its region's rows.
      const copy = this.table("public.parts");
      for (const [key, row] of copy) if (row.region === partition[1]) copy.delete(key);
      return;
    }
    super.applyChange({ ...change, table: "parts" } as Change);
  }
}

Deno.test("a partition truncated during a backfill of its table: the chunk is read again, no other row is lost", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE parts(id int, region text, qty int, PRIMARY KEY (id, region) INCLUDE (qty))
       PARTITION BY LIST (region);
     CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu');
     CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us');
     INSERT INTO parts SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, g % 100
       FROM generate_series(1, 40000) g;
     CREATE TABLE sentinel(id int PRIMARY KEY)`,
  );
  // Small chunks, so that the backfill is still running when the truncate commits.
  await using api = await startApi(db, { backfillChunkRows: 100 });
  await createStream(api.url, { name: "pt", tables: ["parts", "sentinel"] });
  await using client = await StreamClient.changes(api.url, "pt");
  const replica = new PartsReplica();
  const backfill = await startBackfill(api.url, "pt", { table: "parts", mode: "replace" });
  await consume(
    client,
    replica,
    (c) => c.kind === "backfill" && c.id === backfill.id && c.state === "started",
    "the backfill's started",
  );
  await sql(db, "TRUNCATE parts_us");
  const reading = await consume(client, replica, isDone(backfill.id), "the backfill's done");
  await catchUp(db, client, replica);
  const wanted = await sql<ReplicaRow>(db, "SELECT id, region, qty FROM parts ORDER BY id");
  assert.equal(wanted.length, 20_000);
  assertSameRows(
    replica.table("public.parts"),
    new Map(wanted.map((r) => [JSON.stringify(r.id), r])),
  );
  assert.ok(reading.readFrames > 10, `the truncate came before most chunks: ${reading.readFrames}`);
});

Deno.test("a backfill whose table was dropped ends cancelled, saying why, and the stream's next one runs", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE doomed(id int PRIMARY KEY);
     CREATE TABLE big(id int PRIMARY KEY, note text);
     INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, 20000) g;
     CREATE TABLE sentinel(id int PRIMARY KEY);
     INSERT INTO sentinel SELECT generate_series(1, 50)`,
  );
  await using api = await startApi(db, { backfillChunkRows: 100 });
  await createStream(api.url, { name: "gone", tables: ["doomed", "big", "sentinel"] });
  // Queued while nobody is connected, then its table dropped: it never began.
  const never = await startBackfill(api.url, "gone", { table: "doomed" });
  await sql(db, "DROP TABLE doomed");
  const after = await startBackfill(api.url, "gone", { table: "sentinel" });
  await using client = await StreamClient.changes(api.url, "gone");
  const replica = new Replica();
  await consume(client, replica, isDone(after.id), "the backfill queued behind the dropped one");
  assert.equal(replica.table("public.sentinel").size, 50);
  // One that is running when its table is dropped: its consumer is told, in a frame.
  const running = await startBackfill(api.url, "gone", { table: "big", mode: "replace" });
  await consume(client, replica, (c) => c.kind === "read" && c.table === "big", "a row of big");
  await sql(db, "DROP TABLE big");
  await consume(client, replica, isDone(running.id), "the running backfill's end");
  const end = replica.backfills.find((b) => b.id === running.id && b.state !== "started");
  assert.equal(end?.state, "cancelled", JSON.stringify(end));
  assert.match(end?.reason ?? "", /Cannot backfill: .*big/);
  assert.ok(replica.backfills.every((b) => b.id !== never.id), "no frame of one that never began");
  const listed = await poll(async () => {
    const all = await listBackfills(api.url, "gone");
    return all.every((b) => b.state === "done" || b.state === "cancelled") ? all : undefined;
  }, "every backfill to be finished");
  assert.deepEqual(listed.map((b) => [b.table, b.state]), [
    ["public.doomed", "cancelled"],
    ["public.sentinel", "done"],
    ["public.big", "cancelled"],
  ]);
  assert.match(listed[0].reason ?? "", /table public\.doomed of the stream no longer exists/);
  assert.match(listed[2].reason ?? "", /big/);
});

Deno.test({
  name:
    "relay mode: a backfill goes through the stream's log, and every consumer id gets the same exact copy",
  ignore: !hasNats,
  async fn() {
    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, SETUP);
    await using nats = await NatsServer.start();
    await using server = await ServerProcess.spawn(db, {
      NATS_URL: nats.url,
      RELAY_INSTANCE: "solo",
    });
    await createStream(server.url, { name: "rl", ...STREAM });
    const first = await StreamClient.connect(server.url, "/v2/streams/rl/changes?consumer=first");
    const replica = new Replica();
    const seed = testSeed();
    const writes = writer(db, seed);
    try {
      const backfill = await startBackfill(server.url, "rl", { table: "items", mode: "replace" });
      await consume(first, replica, isDone(backfill.id), "the backfill's done, from the log");
      await writes.stop();
      await catchUp(db, first, replica);
      assertSameRows(replica.table("public.items"), await expected(db));
      // A consumer id that comes later reads the same frames from the log: the same copy.
      await using later = await StreamClient.connect(
        server.url,
        "/v2/streams/rl/changes?consumer=later",
      );
      const copy = new Replica();
      await catchUp(db, later, copy);
      assertSameRows(copy.table("public.items"), await expected(db));
      assert.deepEqual(copy.backfills.map((b) => b.state), ["started", "done"], `seed ${seed}`);
    } finally {
      await writes.stop().catch(() => {});
      await first[Symbol.asyncDispose]();
    }
  },
});
