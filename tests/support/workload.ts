/**
 * Fault-test workload: a steady writer of one-row transactions, and a client
 * that acknowledges each frame after processing it and reconnects whenever
 * the stream ends, until it has seen every row.
 * @module
 */

import pg from "pg";
import type { DatabaseConfig } from "../../src/config.ts";
import { parseLsn } from "../../src/lsn.ts";
import { DEFAULT_WAIT_MS } from "./deadline.ts";
import { StreamClient } from "./harness.ts";

/** Creates `events(id int primary key)`. */
export async function createEvents(db: DatabaseConfig): Promise<void> {
  const client = new pg.Client(db);
  await client.connect();
  await client.query("CREATE TABLE events(id int primary key)");
  await client.end();
}

/**
 * Inserts ids 1..rows, one transaction each, a steady writer pacing itself at about one row per
 * `paceMs`, riding out database restarts. Resolves when all are committed.
 */
export async function writeEvents(db: DatabaseConfig, rows: number, paceMs = 2): Promise<void> {
  let client: pg.Client | undefined;
  let lastProgress = Date.now();
  for (let id = 1; id <= rows;) {
    if (Date.now() - lastProgress > DEFAULT_WAIT_MS) {
      throw new Error(
        `Timed out writing events: no commit for ${DEFAULT_WAIT_MS / 1000} s at id ${id}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, paceMs));
    try {
      if (client === undefined) {
        client = new pg.Client(db);
        client.on("error", () => {});
        await client.connect();
      }
      await client.query("INSERT INTO events VALUES ($1)", [id]);
      id++;
      lastProgress = Date.now();
    } catch (error) {
      // A commit may have landed before the connection died: the row is there, move on.
      if ((error as { code?: string }).code === "23505") id++;
      await client?.end().catch(() => {});
      client = undefined;
      await new Promise((resolve) => setTimeout(resolve, 20)); // database restarting: retry shortly
    }
  }
  await client?.end().catch(() => {});
}

/** What an acking consumer saw. */
export interface ConsumerReport {
  /** Times each id arrived. */
  seen: Map<number, number>;
  /** Arrivals of an id already seen. */
  duplicates: number;
  /** Frames that arrived though PostgreSQL had confirmed their nextlsn when the stream last broke. */
  resentAfterConfirm: number;
  /** Close codes of the streams that ended. */
  closeCodes: number[];
}

/** Options of {@link consume}. */
export interface ConsumeOptions {
  /** Current server address (it may change across restarts). */
  url: () => URL;
  slotName: string;
  rows: number;
  /** Called after each processed (and acked) frame, with the count of frames and of connections so far. */
  onFrame?: (frames: number, connections: number) => Promise<void> | void;
  /** Confirmed position of the slot, read when a stream breaks. */
  confirmedFlush: () => Promise<bigint>;
}

/** Reads `events` rows until ids 1..rows have all arrived, reconnecting after every close. */
export async function consume(options: ConsumeOptions): Promise<ConsumerReport> {
  const report: ConsumerReport = {
    seen: new Map(),
    duplicates: 0,
    resentAfterConfirm: 0,
    closeCodes: [],
  };
  let frames = 0;
  let connections = 0;
  let confirmed = 0n;
  let lastProgress = Date.now();
  while (report.seen.size < options.rows) {
    if (Date.now() - lastProgress > DEFAULT_WAIT_MS) {
      throw new Error(
        `Timed out consuming: no new row for ${DEFAULT_WAIT_MS / 1000} s; ` +
          `${report.seen.size} of ${options.rows} received, closes [${report.closeCodes}]`,
      );
    }
    let client: StreamClient;
    try {
      client = await StreamClient.open(options.url(), options.slotName);
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50)); // server or database still coming back
      continue;
    }
    connections++;
    try {
      while (report.seen.size < options.rows) {
        const frame = await client.next();
        if (parseLsn(frame.nextlsn) <= confirmed) report.resentAfterConfirm++;
        for (const change of frame.change) {
          const id = change.columnvalues![0] as number;
          if (report.seen.has(id)) report.duplicates++;
          else lastProgress = Date.now();
          report.seen.set(id, (report.seen.get(id) ?? 0) + 1);
        }
        client.ack(frame.nextlsn);
        // A real consumer does I/O per frame; yielding also lets Deno's WebSocket flush the ack.
        await new Promise((resolve) => setTimeout(resolve, 0));
        await options.onFrame?.(++frames, connections);
      }
      await client[Symbol.asyncDispose]();
    } catch {
      report.closeCodes.push((await client.closedWithin()).code);
      confirmed = await options.confirmedFlush().catch(() => confirmed);
    }
  }
  return report;
}

/** The slot's confirmed_flush_lsn. */
export async function confirmedFlush(db: DatabaseConfig, slotName: string): Promise<bigint> {
  const client = new pg.Client(db);
  await client.connect();
  try {
    const { rows } = await client.query(
      "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1",
      [slotName],
    );
    return parseLsn(rows[0].lsn);
  } finally {
    await client.end();
  }
}

/** Asserts the at-least-once contract and prints the scenario's numbers. */
export function summarize(name: string, rows: number, report: ConsumerReport): string {
  const missing = [];
  for (let id = 1; id <= rows; id++) if (!report.seen.has(id)) missing.push(id);
  const line =
    `${name}: rows written ${rows}, rows received ${report.seen.size}, duplicates ${report.duplicates}, ` +
    `re-sent after confirm ${report.resentAfterConfirm}, closes [${report.closeCodes.join(",")}]`;
  console.log(line);
  if (missing.length > 0) throw new Error(`${line}; missing ids ${missing.slice(0, 20).join(",")}`);
  return line;
}
