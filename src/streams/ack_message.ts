/**
 * A client's acknowledgement, `{"lsn":"X/Y"}`, read from a websocket
 * message and checked against what the socket was sent: the one set of
 * rules (and close codes) for direct and relayed streams alike.
 * @module
 */

import { formatLsn, type Lsn, parseLsn } from "../lsn.ts";
import { CloseCode, type CloseCodeValue, MAX_CLIENT_MESSAGE_BYTES } from "../protocol.ts";

/** Why an acknowledgement closes the socket. */
export interface AckRefusal {
  code: CloseCodeValue;
  reason: string;
}

/**
 * The position `data` acknowledges, or why it may not: not text, too
 * large, not `{"lsn":"X/Y"}`, or beyond `delivered`, the last `nextlsn`
 * sent on this socket.
 */
export function readAck(data: unknown, delivered: Lsn): Lsn | AckRefusal {
  if (typeof data !== "string") {
    return {
      code: CloseCode.UnsupportedData,
      reason: 'only text frames are accepted: send {"lsn":"X/Y"}',
    };
  }
  if (data.length > MAX_CLIENT_MESSAGE_BYTES) {
    return {
      code: CloseCode.MessageTooBig,
      reason: `messages are limited to ${MAX_CLIENT_MESSAGE_BYTES} bytes`,
    };
  }
  let lsn: Lsn;
  // What every client sends, read without a JSON parse; anything else is parsed and judged.
  const plain = PLAIN_ACK.exec(data);
  if (plain !== null) {
    lsn = (BigInt(`0x${plain[1]}`) << 32n) | BigInt(`0x${plain[2]}`);
    return lsn > delivered ? beyond(lsn, delivered) : lsn;
  }
  try {
    const message: unknown = JSON.parse(data);
    const text = (message as { lsn?: unknown } | null)?.lsn;
    if (typeof message !== "object" || message === null || typeof text !== "string") {
      throw new TypeError('expected {"lsn":"X/Y"}');
    }
    lsn = parseLsn(text);
  } catch (error) {
    const detail = error instanceof SyntaxError
      ? 'not JSON; expected {"lsn":"X/Y"}'
      : (error as Error).message;
    return { code: CloseCode.InvalidAck, reason: `invalid ack: ${detail}` };
  }
  return lsn > delivered ? beyond(lsn, delivered) : lsn;
}

/** `{"lsn":"X/Y"}` exactly, as clients write it. */
const PLAIN_ACK = /^\{"lsn":"([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})"\}$/;

/** The refusal of an ack beyond what this socket was sent. */
function beyond(lsn: Lsn, delivered: Lsn): AckRefusal {
  return {
    code: CloseCode.InvalidAck,
    reason: `invalid ack: ${formatLsn(lsn)} is beyond the last nextlsn sent on this socket (${
      formatLsn(delivered)
    })`,
  };
}
