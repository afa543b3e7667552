/**
 * Tails: read-only websockets that see a copy of every frame a stream's
 * consumer is sent, for debugging and viewers. A tail never acknowledges
 * (what it sends is ignored), never replays, and never moves the stream's
 * position; any number may watch a stream. A tail that cannot keep up is
 * closed rather than allowed to hold frames in memory.
 * @module
 */

import { atTime } from "../deadline_timer.ts";
import { CloseCode, type CloseCodeValue } from "../protocol.ts";
import { closeSocket } from "./consumer_session.ts";

/** A tail's buffered bytes beyond which it is closed as too slow. */
export const TAIL_MAX_BUFFERED_BYTES = 8 << 20;

/**
 * Sends `text` to the tail `socket` if it is open and keeping up; one too
 * slow is closed (4409) instead. Whether it was sent.
 */
export function sendToTail(socket: WebSocket, text: string): boolean {
  if (socket.readyState !== WebSocket.OPEN) return false;
  if (socket.bufferedAmount > TAIL_MAX_BUFFERED_BYTES) {
    socket.close(CloseCode.TryAgainLater, "tail too slow to keep up; reconnect");
    return false;
  }
  socket.send(text);
  return true;
}

/** The tails of every stream, by stream name. */
export class TailHub {
  readonly #tails = new Map<string, Set<WebSocket>>();

  /**
   * Adds `socket` (just upgraded) as a tail of `stream`, until it closes, or
   * (4401) until `expiresAt`, when its credential expires.
   */
  add(stream: string, socket: WebSocket, expiresAt?: number): void {
    let tails = this.#tails.get(stream);
    if (tails === undefined) this.#tails.set(stream, tails = new Set());
    tails.add(socket);
    const cancel = expiresAt === undefined ? undefined : atTime(expiresAt, () => {
      if (socket.readyState === WebSocket.OPEN) {
        socket.close(CloseCode.TokenExpired, "token expired; reconnect with a fresh token");
      }
    });
    socket.addEventListener("close", () => {
      cancel?.();
      tails.delete(socket);
      if (tails.size === 0 && this.#tails.get(stream) === tails) this.#tails.delete(stream);
    });
  }

  /** How many tails watch `stream`. */
  count(stream: string): number {
    return this.#tails.get(stream)?.size ?? 0;
  }

  /** How many tails watch each stream that has some. */
  counts(): Map<string, number> {
    return new Map([...this.#tails].map(([stream, tails]) => [stream, tails.size]));
  }

  /** Sends `text` (a frame the consumer was sent) to every open tail of `stream`. */
  publish(stream: string, text: string): void {
    const tails = this.#tails.get(stream);
    if (tails === undefined) return;
    for (const socket of tails) sendToTail(socket, text);
  }

  /** Closes every tail of `stream` with `code` and `reason`. */
  close(stream: string, code: CloseCodeValue, reason: string): void {
    for (const socket of this.#tails.get(stream) ?? []) closeSocket(socket, code, reason);
  }

  /** Closes every tail. */
  closeAll(code: CloseCodeValue, reason: string): void {
    for (const stream of this.#tails.keys()) this.close(stream, code, reason);
  }
}
