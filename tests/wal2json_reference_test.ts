import assert from "node:assert/strict";
import { init, postJson, startApi, startPostgres } from "./support/harness.ts";
import { changeText, recordedFrames, streamReference } from "./support/reference.ts";

Deno.test("stream frames equal wal2json's recorded output for the reference workload", async () => {
  await using postgres = await startPostgres();
  await using api = await startApi(postgres.database);
  const received = await streamReference(postgres.database, api.url);
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
  await using api = await startApi(postgres.database);
  await streamReference(postgres.database, api.url);
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
