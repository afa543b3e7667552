/**
 * Log sequence numbers. One representation everywhere: a `bigint` holding the
 * 64-bit WAL position; text only at the edges, in PostgreSQL's `X/Y` form.
 * @module
 */

/** A WAL position, as PostgreSQL's 64-bit `pg_lsn`. */
export type Lsn = bigint;

/** The zero position, `0/0`: "no position" in replication commands. */
export const ZERO_LSN: Lsn = 0n;

const MAX_LSN: Lsn = (1n << 64n) - 1n;
const LSN_TEXT = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/;

/** Parses `X/Y` (hex, as PostgreSQL prints a `pg_lsn`); throws a `TypeError` for anything else. */
export function parseLsn(text: string): Lsn {
  const match = typeof text === "string" ? LSN_TEXT.exec(text) : null;
  if (match === null) {
    throw new TypeError(
      `Invalid LSN ${JSON.stringify(text)}: expected "X/Y" in hex, e.g. "0/170FCB0"`,
    );
  }
  return (BigInt(`0x${match[1]}`) << 32n) | BigInt(`0x${match[2]}`);
}

/** Formats an LSN as PostgreSQL and wal2json do: upper-case hex halves, `X/Y`. */
export function formatLsn(lsn: Lsn): string {
  if (lsn < 0n || lsn > MAX_LSN) throw new RangeError(`LSN out of range: ${lsn}`);
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${
    (lsn & 0xffffffffn).toString(16).toUpperCase()
  }`;
}

/** Formats the LSN stored big-endian at `offset` of `bytes` without a `bigint` round trip (hot path). */
export function formatLsnAt(view: DataView, offset: number): string {
  const hi = view.getUint32(offset);
  const lo = view.getUint32(offset + 4);
  return `${hi.toString(16).toUpperCase()}/${lo.toString(16).toUpperCase()}`;
}

/** Reads the big-endian 64-bit LSN at `offset` of `view`. */
export function readLsn(view: DataView, offset: number): Lsn {
  return view.getBigUint64(offset);
}
