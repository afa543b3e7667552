import assert from "node:assert/strict";
import { init, postJson, sql, startApi, startPostgres } from "./support/harness.ts";
import { changeText, recordedFrames, streamReference } from "./support/reference.ts";

/**
 * Database defaults under which frames and snapshot rows must not change: each alters the text
 * PostgreSQL writes for some type (bytea, dates, intervals, floats), and an operator may set any
 * of them per database or role.
 */
const SETTINGS: Record<string, string[]> = {
  "the defaults": [],
  "hostile database defaults": [
    "ALTER DATABASE postgres SET bytea_output = 'escape'",
    "ALTER DATABASE postgres SET DateStyle = 'SQL, DMY'",
    "ALTER DATABASE postgres SET IntervalStyle = 'sql_standard'",
    "ALTER DATABASE postgres SET extra_float_digits = 0",
  ],
};

/** Parses JSON keeping every number's source text (bigint and numeric stay exact). */
function parseVerbatim(text: string): unknown {
  return JSON.parse(
    text,
    (_key, value, context?: { source: string }) =>
      typeof value === "number" ? { number: context!.source } : value,
  );
}

for (const [label, statements] of Object.entries(SETTINGS)) {
  Deno.test(`stream frames equal wal2json's recorded output for the reference workload, under ${label}`, async () => {
    await using postgres = await startPostgres();
    for (const statement of statements) await sql(postgres.database, statement);
    await using api = await startApi(postgres.database);
    const received = await streamReference(postgres.database, api.url);
    const expected = await recordedFrames();
    assert.equal(received.length, expected.length);
    assert.deepEqual(received.map(changeText), expected.map(changeText));
  });

  Deno.test(`a snapshot row reads exactly as the stream wrote the same row, under ${label}`, async () => {
    await using postgres = await startPostgres();
    for (const statement of statements) await sql(postgres.database, statement);
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
    for (const path of ["/v1/snapshot/data", "/v1/snapshot/export"]) {
      const response = await postJson(new URL(path, api.url), {
        slotName: snapshotted,
        table: "t_types",
        order_by: { column: "id", order: "ASC" },
      });
      assert.equal(response.status, 200);
      const rows = path.endsWith("data")
        ? parseVerbatim(response.text)
        : response.text.trimEnd().split("\n").map(parseVerbatim);
      assert.deepEqual(rows, expected, path);
    }
  });
}
