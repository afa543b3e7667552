import assert from "node:assert/strict";
import { formatLsn, formatLsnAt, parseLsn } from "../src/lsn.ts";

Deno.test("parseLsn() and formatLsn() round-trip PostgreSQL's X/Y form", () => {
  for (const text of ["0/0", "0/170FCB0", "16/B374D848", "FFFFFFFF/FFFFFFFF"]) {
    assert.equal(formatLsn(parseLsn(text)), text);
  }
  assert.equal(parseLsn("1/0"), 1n << 32n);
  assert.equal(formatLsn(parseLsn("0/00a")), "0/A");
});

Deno.test("parseLsn() rejects anything but two hex halves", () => {
  for (const bad of ["", "0", "0/", "/1", "0/1/2", "G/1", "0/123456789", " 0/1", "-1/0"]) {
    assert.throws(() => parseLsn(bad), TypeError, bad);
  }
});

Deno.test("formatLsnAt() reads a big-endian LSN as formatLsn() prints it", () => {
  const view = new DataView(new ArrayBuffer(10));
  view.setBigUint64(2, 0x16_b374d848n);
  assert.equal(formatLsnAt(view, 2), "16/B374D848");
  assert.throws(() => formatLsn(-1n), RangeError);
});
