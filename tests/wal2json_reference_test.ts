import assert from "node:assert/strict";
import { init, sql, startApi, startPostgres, StreamClient } from "./support/harness.ts";
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
