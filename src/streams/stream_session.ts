/**
 * One websocket client streaming one slot: frames out through a sink that
 * respects the socket's `bufferedAmount`, acknowledgements in, validated
 * against what this socket was actually sent.
 * @module
 */

import { atTime } from "../deadline_timer.ts";
import { type Lsn, ZERO_LSN } from "../lsn.ts";
import { readAck } from "./ack_message.ts";
import { type Frame, StreamScopeError } from "../replication/pgoutput_decoder.ts";
import { CloseCode, type CloseCodeValue } from "../protocol.ts";
import {
  ReplicationLostError,
  type ReplicationService,
} from "../replication/replication_service.ts";
import { errorMessage, log } from "../observability/log.ts";

/** Socket buffer above which sending pauses, and below which it resumes. */
export const SOCKET_HIGH_WATER_BYTES = 1 << 20;
/** Socket buffer below which a paused sink resumes sending. */
export const SOCKET_LOW_WATER_BYTES = 256 << 10;

/** Longest run of sending before the event loop gets a turn to read acks. */
const YIELD_EVERY_MS = 5;
/** A gap between frames this long means the sink waited for the next one (a live stream). */
const WAITED_MS = 1;

/** Waits until the socket's outgoing buffer drains below the low-water mark (or the socket closes). */
export async function drained(socket: WebSocket, signal: AbortSignal): Promise<void> {
  // WebSocket has no "drain" event: poll the buffered amount while above the mark.
  while (
    socket.bufferedAmount > SOCKET_LOW_WATER_BYTES && socket.readyState === WebSocket.OPEN &&
    !signal.aborted
  ) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** What a session tells whoever watches it (tails, metrics). */
export interface SessionObserver {
  /** A frame was written to the consumer's socket. */
  sent?(frame: Frame): void;
  /** The consumer acknowledged everything up to `lsn`. */
  acknowledged?(lsn: Lsn): void;
}

/** A check a session repeats while it is open; a reason it returns closes it with 4422. */
export interface SessionMonitor {
  check(): Promise<string | undefined>;
  intervalMs: number;
}

/** What a session is given besides its socket and replication. */
export interface SessionOptions {
  observer?: SessionObserver;
  /** When the client's credential expires (ms since the epoch): the socket closes with 4401. */
  expiresAt?: number;
  monitor?: SessionMonitor;
}

/** A websocket bound to a {@link ReplicationService} until either side ends. */
export class StreamSession {
  readonly slotName: string;
  readonly #socket: WebSocket;
  readonly #service: ReplicationService;
  readonly #abort = new AbortController();
  readonly #observer: SessionObserver;
  #delivered: Lsn = ZERO_LSN;
  #acked: Lsn = ZERO_LSN;
  #closed: { code: number; reason: string; by: "server" | "client" } | undefined;
  /** Settles when the socket is closed and the replication connection ended. */
  readonly done: Promise<void>;

  /** Binds `socket` (from `Deno.upgradeWebSocket`) to `service`. */
  constructor(socket: WebSocket, service: ReplicationService, options: SessionOptions = {}) {
    const { observer = {}, expiresAt, monitor } = options;
    this.slotName = service.slotName;
    this.#socket = socket;
    this.#service = service;
    this.#observer = observer;
    if (monitor !== undefined) this.#watch(monitor);
    if (expiresAt !== undefined) {
      // The credential's end closes the socket; the client reconnects with a fresh one and resumes.
      const cancel = atTime(
        expiresAt,
        () => this.close(CloseCode.TokenExpired, "token expired; reconnect with a fresh token"),
      );
      this.#abort.signal.addEventListener("abort", cancel, { once: true });
    }
    socket.addEventListener("message", (event) => this.#onMessage(event));
    const closed = new Promise<void>((resolve) =>
      socket.addEventListener("close", (event) => {
        this.#closed ??= { code: event.code, reason: event.reason, by: "client" };
        resolve();
      }, { once: true })
    );
    const opened = new Promise<void>((resolve) =>
      socket.addEventListener("open", () => resolve(), { once: true })
    );
    this.done = Promise.race([opened, closed]).then(() => this.#pump()).finally(async () => {
      this.#abort.abort();
      await service.close();
    });
    // The client leaving ends the pump at once.
    void closed.then(() => this.#abort.abort());
  }

  /** Runs `monitor`'s check now and then every interval until the session ends. */
  #watch(monitor: SessionMonitor): void {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const run = async () => {
      const reason = await monitor.check().catch(() => undefined);
      if (this.#abort.signal.aborted) return;
      if (reason !== undefined) return this.close(CloseCode.DefinitionBroken, reason);
      timer = setTimeout(run, monitor.intervalMs);
    };
    this.#abort.signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
    void run();
  }

  /** How the socket closed, who closed it, and the last position acknowledged on it. */
  get outcome(): { code?: number; reason?: string; by?: string; acked: Lsn } {
    return { ...this.#closed, acked: this.#acked };
  }

  /** True once the socket is closing or closed: the session only winds down from here. */
  get ending(): boolean {
    return this.#abort.signal.aborted || this.#socket.readyState >= WebSocket.CLOSING;
  }

  async #pump(): Promise<void> {
    const socket = this.#socket;
    const signal = this.#abort.signal;
    if (socket.readyState !== WebSocket.OPEN) return;
    const reader = this.#service.readable.getReader();
    const cancel = () => void reader.cancel().catch(() => {});
    signal.addEventListener("abort", cancel, { once: true });
    let lastYield = performance.now();
    // Every wait comes before the next read, while no frame is held: a frame held across a wait
    // lives through young-generation collections (the decoder keeps allocating) and is moved to
    // the old generation, where a large transaction's frames piled up until a full collection.
    let result: ReadableStreamReadResult<Frame> | undefined;
    try {
      for (;;) {
        if (socket.bufferedAmount > SOCKET_HIGH_WATER_BYTES) {
          await drained(socket, signal);
          lastYield = performance.now();
        } else if (performance.now() - lastYield > YIELD_EVERY_MS) {
          // Draining a backlog resolves in microtasks only: give the event loop a turn, so that the
          // client's acks are read (and confirmed) while the backlog is sent, not after it.
          await new Promise((resolve) => setTimeout(resolve, 0));
          lastYield = performance.now();
        }
        if (signal.aborted || socket.readyState !== WebSocket.OPEN) return;
        const asked = performance.now();
        result = await reader.read();
        if (result.done) break;
        const now = performance.now();
        // A frame that was waited for came through the event loop, which read the acks meanwhile.
        if (now - asked > WAITED_MS) lastYield = now;
        if (socket.readyState !== WebSocket.OPEN) return;
        socket.send(result.value.text);
        this.#delivered = result.value.nextLsn;
        this.#observer.sent?.(result.value);
        result = undefined;
      }
      this.close(CloseCode.Normal, "stream ended");
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ReplicationLostError && error.cause instanceof StreamScopeError) {
        this.close(CloseCode.DefinitionBroken, error.cause.message);
      } else if (error instanceof ReplicationLostError) {
        log.warn("replication.lost", "the replication connection was lost", {
          slot: this.slotName,
          error: errorMessage(error.cause),
        });
        this.close(
          CloseCode.TryAgainLater,
          "replication connection lost; reconnect to resume after your last ack",
        );
      } else {
        log.error("stream.failed", `the stream of slot "${this.slotName}" failed`, {
          slot: this.slotName,
          error: errorMessage(error),
        });
        this.close(
          CloseCode.InternalError,
          "internal error; reconnect to resume after your last ack",
        );
      }
    } finally {
      signal.removeEventListener("abort", cancel);
      cancel();
    }
  }

  #onMessage(event: MessageEvent): void {
    const lsn = readAck(event.data, this.#delivered);
    if (typeof lsn !== "bigint") return this.close(lsn.code, lsn.reason);
    // An ack at or below the last one (say, of a re-delivered frame) changes nothing.
    if (lsn <= this.#acked) return;
    this.#acked = lsn;
    this.#service.acknowledge(lsn);
    this.#observer.acknowledged?.(lsn);
  }

  /** Closes the socket with `code` and `reason` (at most 123 bytes), ending the stream. */
  close(code: CloseCodeValue, reason: string): void {
    this.#closed ??= { code, reason, by: "server" };
    this.#abort.abort();
    if (
      this.#socket.readyState === WebSocket.OPEN || this.#socket.readyState === WebSocket.CONNECTING
    ) {
      try {
        this.#socket.close(code, truncateReason(reason));
      } catch { /* already closing */ }
    }
  }
}

/** Close reasons are limited to 123 UTF-8 bytes: `reason`, shortened to fit. */
export function truncateReason(reason: string): string {
  const bytes = new TextEncoder().encode(reason);
  if (bytes.length <= 123) return reason;
  return new TextDecoder().decode(bytes.slice(0, 120)).replace(/\uFFFD$/, "") + "...";
}
