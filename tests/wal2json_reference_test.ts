import assert from "node:assert/strict";
import { init, postJson, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";
import {
  changeText,
  framesUntilSentinel,
  recordedFrames,
  referenceScript,
  runWorkload,
} from "./support/reference.ts";

Deno.test("stream frames equal wal2json's recorded output for the reference workload", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const { setup, workload } = await referenceScript();
  await sql(db, setup);
  await using api = await startApi(db);
  const slotName = await init(api.url);
  await using client = await StreamClient.open(api.url, slotName);
  await runWorkload(db, workload);

  const received = await framesUntilSentinel(client);
  const expected = await recordedFrames();
  assert.equal(received.length, expected.length);
  assert.deepEqual(received.map(changeText), expected.map(changeText));
});

/** Parses JSON keeping every number's source text (bigint and numeric stay exact). */
function parseVerbatim(text: string): unknown {
  return JSON.parse(
    text,
    (_key, value, context?: { source: string }) =>
      typeof value === "number" ? { number: context!.source } : value,
  );
}

Deno.test("a snapshot row reads exactly as the stream wrote the same row", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const { setup, workload } = await referenceScript();
  await sql(db, setup);
  await using api = await startApi(db);
  const streamed = await init(api.url);
  {
    await using client = await StreamClient.open(api.url, streamed);
    await runWorkload(db, workload);
    await framesUntilSentinel(client);
  }
  const inserts = (await recordedFrames())
    .flatMap((frame) => (parseVerbatim(frame) as { change: Record<string, unknown[]>[] }).change)
    .filter((change) => change.table as unknown === "t_types");
  assert.equal(inserts.length, 3);
  const id = (change: Record<string, unknown[]>) =>
    BigInt((change.columnvalues[0] as { number: string }).number);
  const expected = inserts.sort((a, b) => Number(id(a) - id(b))).map((change) =>
    Object.fromEntries(change.columnnames.map((name, i) => [name, change.columnvalues[i]]))
  );

  const snapshotted = await init(api.url);
  const page = await postJson(new URL("/v1/snapshot/data", api.url), {
    slotName: snapshotted,
    table: "t_types",
    order_by: { column: "id", order: "ASC" },
  });
  assert.equal(page.status, 200);
  assert.deepEqual(parseVerbatim(page.text), expected);
});
