import assert from "node:assert/strict";
import { parseLsn } from "../src/lsn.ts";
import { POSTGRES_EPOCH_MS, standbyStatusUpdate } from "../src/replication/standby_status.ts";

Deno.test("standbyStatusUpdate() confirms exactly the given LSN, dated from 2000-01-01", () => {
  const lsn = parseLsn("16/B374D848");
  const message = standbyStatusUpdate(lsn, POSTGRES_EPOCH_MS + 1500);
  const view = new DataView(message.buffer, message.byteOffset, message.byteLength);
  assert.equal(message.length, 34);
  assert.equal(String.fromCharCode(message[0]), "r");
  for (const offset of [1, 9, 17]) assert.equal(view.getBigUint64(offset), lsn);
  assert.equal(view.getBigInt64(25), 1_500_000n);
  assert.equal(message[33], 0);
  assert.equal(POSTGRES_EPOCH_MS, 946_684_800_000);
});
