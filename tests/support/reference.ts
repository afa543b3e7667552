/**
 * The wal2json reference workload (`tests/fixtures/wal2json_cases.sql`, a
 * copy of shared/reference): its setup, its statements one by one, and the
 * recorded output.
 * @module
 */

import type { DatabaseConfig } from "../../src/config.ts";
import { init, sql, StreamClient } from "./harness.ts";

const FIXTURES = new URL("../fixtures/", import.meta.url);

/** Setup statements (above the marker) and workload statements (below it), each a separate query. */
async function referenceScript(): Promise<{ setup: string; workload: string[] }> {
  const text = await Deno.readTextFile(new URL("wal2json_cases.sql", FIXTURES));
  const [setup, workload] = text.split(/^-- marker.*$/m);
  const statements: string[] = [];
  let current = "";
  for (const line of workload.split("\n")) {
    if (line.trim() === "" || line.startsWith("--")) continue;
    current += line + "\n";
    // A statement (or a BEGIN ... COMMIT line) ends with a semicolon at the end of a line.
    if (line.trimEnd().endsWith(";")) {
      statements.push(current);
      current = "";
    }
  }
  return { setup, workload: statements };
}

/** The recorded frames with at least one change, as raw text lines. */
export async function recordedFrames(): Promise<string[]> {
  const text = await Deno.readTextFile(new URL("wal2json_cases.jsonl", FIXTURES));
  return text.split("\n").filter((line) => line !== "" && !line.endsWith('"change":[]}'));
}

const FRAME = /^\{"nextlsn":"[0-9A-F]+\/[0-9A-F]+","change":(\[.*\])\}$/s;

/** The raw `change` array text of a frame; throws if the frame is not in wal2json v1 shape. */
export function changeText(frame: string): string {
  const match = FRAME.exec(frame);
  if (match === null) throw new Error(`not a wal2json v1 frame: ${frame.slice(0, 200)}`);
  return match[1];
}

/** Runs each workload statement as its own query, then a sentinel insert. */
async function runWorkload(db: DatabaseConfig, workload: string[]): Promise<void> {
  for (const statement of workload) await sql(db, statement);
  await sql(
    db,
    "CREATE TABLE IF NOT EXISTS sentinel(id int primary key); INSERT INTO sentinel VALUES (1)",
  );
}

/** Frames received up to (not including) the sentinel's. */
async function framesUntilSentinel(client: StreamClient): Promise<string[]> {
  const frames: string[] = [];
  for (;;) {
    const frame = await client.nextText();
    if (frame.includes('"table":"sentinel"')) return frames;
    frames.push(frame);
  }
}

/**
 * The reference setup on `db`, then `prepare` (e.g. another decoder's slot), then a new slot of
 * the server at `base` streaming the workload: returns the frames received, sentinel excluded.
 */
export async function streamReference(
  db: DatabaseConfig,
  base: URL,
  prepare: () => Promise<unknown> = async () => {},
): Promise<string[]> {
  const { setup, workload } = await referenceScript();
  return await streamWorkload(db, base, setup, workload, prepare);
}

/** `setup`, `prepare`, a new slot of the server at `base`, then each of `workload` streamed: the frames, sentinel excluded. */
export async function streamWorkload(
  db: DatabaseConfig,
  base: URL,
  setup: string,
  workload: string[],
  prepare: () => Promise<unknown> = async () => {},
): Promise<string[]> {
  await sql(db, setup);
  await prepare();
  const slotName = await init(base);
  await using client = await StreamClient.open(base, slotName);
  await runWorkload(db, workload);
  return await framesUntilSentinel(client);
}
