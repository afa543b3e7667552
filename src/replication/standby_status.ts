/**
 * The Standby Status Update message a replication client sends to confirm
 * a position ('r' in the streaming replication protocol's CopyData).
 * @module
 */

import { Buffer } from "node:buffer";
import type { Lsn } from "../lsn.ts";

/** PostgreSQL's epoch, 2000-01-01 UTC, in Unix milliseconds. */
export const POSTGRES_EPOCH_MS = Date.UTC(2000, 0, 1);

/**
 * `'r'`, then the position written, flushed and applied (all `lsn`: the
 * client confirms what it consumed, nothing more), the send time in
 * microseconds since {@link POSTGRES_EPOCH_MS}, and whether a reply is wanted.
 */
export function standbyStatusUpdate(
  lsn: Lsn,
  nowMs: number = Date.now(),
  replyRequested = false,
): Buffer {
  const message = Buffer.alloc(34);
  const view = new DataView(message.buffer, message.byteOffset, message.byteLength);
  message[0] = 0x72; // 'r'
  view.setBigUint64(1, lsn);
  view.setBigUint64(9, lsn);
  view.setBigUint64(17, lsn);
  view.setBigInt64(25, BigInt(Math.round(nowMs - POSTGRES_EPOCH_MS)) * 1000n);
  message[33] = replyRequested ? 1 : 0;
  return message;
}
