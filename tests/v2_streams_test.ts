import assert from "node:assert/strict";
import pg from "pg";
import type { RowChange } from "../src/protocol.ts";
import { deadline } from "./support/deadline.ts";
import {
  createStream,
  ServerProcess,
  sql,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";

const ROWS = 600;

/** A writer of one-row transactions into `orders`, `users` and `logs` in turn, pacing itself. */
async function write(db: pg.ClientConfig): Promise<void> {
  const client = new pg.Client(db);
  await client.connect();
  try {
    for (let i = 1; i <= ROWS; i++) {
      const table = ["orders", "users", "logs"][i % 3];
      await client.query(`INSERT INTO ${table} VALUES ($1, $2)`, [i, i % 2 === 0 ? "eu" : "us"]);
      if (i % 50 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    }
  } finally {
    await client.end();
  }
}

/** What a stream should carry of the writer's rows. */
const EXPECTED: Record<string, (i: number) => boolean> = {
  "orders-all": (i) => i % 3 === 0,
  "users-eu": (i) => i % 3 === 1 && i % 2 === 0,
  "logs-and-orders-us": (i) => (i % 3 === 2 || i % 3 === 0) && i % 2 === 1,
};

/**
 * Reads a stream, acking each frame after processing it, reconnecting (to the current server)
 * whenever its socket closes, until it has every id it should. Ids seen more than once are only
 * re-deliveries after a reconnect.
 */
async function consume(
  name: string,
  url: () => URL,
  onFrame: (frames: number) => Promise<void> | void = () => {},
): Promise<{ ids: Set<number>; duplicates: number; reconnects: number }> {
  const wanted = Array.from({ length: ROWS }, (_, i) => i + 1).filter(EXPECTED[name]).length;
  const ids = new Set<number>();
  let duplicates = 0;
  let reconnects = -1;
  let frames = 0;
  while (ids.size < wanted) {
    reconnects++;
    let client: StreamClient;
    try {
      client = await StreamClient.changes(url(), name);
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50));
      continue;
    }
    try {
      while (ids.size < wanted) {
        const frame = await client.nextV2();
        for (const change of frame.change) {
          if (change.kind !== "insert") continue;
          const id = (change as RowChange).columnvalues![0] as number;
          if (!EXPECTED[name](id)) throw new Error(`${name} got id ${id}, outside its definition`);
          if (ids.has(id)) duplicates++;
          ids.add(id);
        }
        client.ack(frame.nextlsn);
        await onFrame(++frames);
      }
      await client[Symbol.asyncDispose]();
    } catch (error) {
      if ((error as Error).message.includes("outside its definition")) throw error;
      await client.closedWithin();
    }
  }
  return { ids, duplicates, reconnects };
}

Deno.test("three streams on one database each get exactly their own changes, one through a server crash", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    `CREATE TABLE orders(id int primary key, region text);
     CREATE TABLE users(id int primary key, region text);
     CREATE TABLE logs(id int primary key, region text);`,
  );
  let server = await ServerProcess.spawn(db);
  try {
    await createStream(server.url, { name: "orders-all", tables: ["orders"] });
    await createStream(server.url, {
      name: "users-eu",
      tables: [{ table: "users", columns: ["id"], where: [["region", "=", "eu"]] }],
    });
    await createStream(server.url, {
      name: "logs-and-orders-us",
      tables: [
        { table: "logs", where: [["region", "<>", "eu"]] },
        { table: "orders", where: [["region", "in", ["us"]]] },
      ],
      operations: ["insert"],
    });
    const writer = write(db);
    let killed = false;
    const results = await deadline(
      Promise.all([
        consume("orders-all", () => server.url),
        consume("logs-and-orders-us", () => server.url),
        // users-eu's server is killed (SIGKILL) after its 30th frame, and started again.
        consume("users-eu", () => server.url, async (frames) => {
          if (frames !== 30 || killed) return;
          killed = true;
          await server.kill("SIGKILL");
          server = await ServerProcess.spawn(db);
        }),
      ]),
      "three consumers to receive every row of their streams",
    );
    await writer;
    assert.ok(killed);
    for (
      const [name, result] of Object.entries({
        "orders-all": results[0],
        "logs-and-orders-us": results[1],
        "users-eu": results[2],
      })
    ) {
      const want = Array.from({ length: ROWS }, (_, i) => i + 1).filter(EXPECTED[name]);
      assert.deepEqual([...result.ids].sort((a, b) => a - b), want, name);
      console.log(
        `${name}: ${result.ids.size} rows, ${result.duplicates} re-delivered, ${result.reconnects} reconnects`,
      );
      if (result.reconnects === 0) {
        assert.equal(result.duplicates, 0, `${name} got duplicates without a reconnect`);
      }
    }
  } finally {
    await server.kill("SIGKILL");
  }
});
