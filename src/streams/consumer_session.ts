/**
 * One consumer's websocket, whatever its frames come from: the one place
 * where the rules about frames and acknowledgements are kept (invariants
 * 2–4, 10 and the close codes of `docs/protocol.md`). It sends what its
 * {@link FrameSource} yields, pausing while the socket's buffer is full;
 * remembers what this socket was sent; takes only acknowledgements of it
 * (`4400` otherwise) and passes them on; closes with `4401` when the
 * credential expires, `4422` when a monitor says the definition broke, and
 * the code its source ends with (`1013` lost, `4422`, `4411`). A plain
 * stream and a relayed one differ only in the source they give it.
 * @module
 */

import { atTime } from "../deadline_timer.ts";
import { type Lsn, ZERO_LSN } from "../lsn.ts";
import { errorMessage, log } from "../observability/log.ts";
import { CloseCode, type CloseCodeValue } from "../protocol.ts";
import { readAck } from "./ack_message.ts";

/** Socket buffer above which sending pauses. */
export const SOCKET_HIGH_WATER_BYTES = 1 << 20;
/** Socket buffer below which a paused session resumes sending. */
export const SOCKET_LOW_WATER_BYTES = 256 << 10;

/** Longest run of sending before the event loop gets a turn to read acks. */
const YIELD_EVERY_MS = 5;
/** A gap between frames this long means the session waited for the next one (a live stream). */
const WAITED_MS = 1;

/** A frame as a session sends it. */
export interface OutgoingFrame {
  /** The frame's JSON text, sent as is. */
  text: string;
  /**
   * What acknowledging it confirms: its transaction's `nextlsn`, or, for a
   * partial chunk, the last complete transaction's (acking it changes nothing).
   */
  nextLsn: Lsn;
  partial: boolean;
  /** UTF-8 bytes of `text`, where the source knows them without counting. */
  bytes?: number;
  /** Changes in it, and its transaction's commit time (ms), where the source knows them. */
  changes?: number;
  commitTime?: number;
}

/** Where a consumer's frames come from and where its acknowledgements go: a slot, or a log. */
export interface FrameSource {
  /**
   * The next frame; `undefined` when the source ended normally. Rejects
   * with a {@link SourceClosed} for a close code the consumer should get.
   */
  read(): Promise<OutgoingFrame | undefined>;
  /** The consumer acknowledged every frame up to `lsn`, a `nextlsn` this socket was sent. */
  acknowledge(lsn: Lsn): void;
  /** Stops reading and lets go of what it holds (a walsender, a JetStream consumer). */
  close(): Promise<void>;
}

/** A source ended in a way its consumer is told by close code: lost (1013), broken (4422), too old (4411). */
export class SourceClosed extends Error {
  /** The close code the consumer gets. */
  readonly code: CloseCodeValue;

  /** `reason` is the consumer's close reason (at most 123 bytes); `options.cause` what happened. */
  constructor(code: CloseCodeValue, reason: string, options?: ErrorOptions) {
    super(reason, options);
    this.name = "SourceClosed";
    this.code = code;
  }
}

/** What a session tells whoever watches it (tails, metrics). */
export interface SessionObserver {
  /** A frame was written to the consumer's socket. */
  sent?(frame: OutgoingFrame): void;
  /** The consumer acknowledged everything up to `lsn`. */
  acknowledged?(lsn: Lsn): void;
}

/** A check a session repeats while it is open; a reason it returns closes it with 4422. */
export interface SessionMonitor {
  check(): Promise<string | undefined>;
  intervalMs: number;
}

/** What a session is given besides its socket and source. */
export interface SessionOptions {
  /** What it is, for the log: `stream "orders"`, `slot "delta_x1"`. */
  label: string;
  observer?: SessionObserver;
  /** When the client's credential expires (ms since the epoch): the socket closes with 4401. */
  expiresAt?: number;
  monitor?: SessionMonitor;
}

/** How a session's socket closed, who closed it, and the last position acknowledged on it. */
export interface SessionOutcome {
  code?: number;
  reason?: string;
  by?: "server" | "client";
  acked: Lsn;
}

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

/** Close reasons are limited to 123 UTF-8 bytes: `reason`, shortened to fit. */
export function truncateReason(reason: string): string {
  const bytes = new TextEncoder().encode(reason);
  if (bytes.length <= 123) return reason;
  return new TextDecoder().decode(bytes.slice(0, 120)).replace(/\uFFFD$/, "") + "...";
}

/**
 * Closes `socket` with `code` and `reason` (shortened to fit). One still
 * connecting is closed once it opens: closed before, Deno drops it without
 * a close frame, and the client, which saw it open, never hears why.
 */
export function closeSocket(socket: WebSocket, code: number, reason: string): void {
  if (socket.readyState === WebSocket.CONNECTING) {
    socket.addEventListener("open", () => closeSocket(socket, code, reason), { once: true });
  } else if (socket.readyState === WebSocket.OPEN) {
    try {
      socket.close(code, truncateReason(reason));
    } catch { /* already closing */ }
  }
}

/** A websocket bound to a {@link FrameSource} until either side ends. */
export class ConsumerSession {
  readonly label: string;
  readonly #socket: WebSocket;
  readonly #source: FrameSource;
  readonly #abort = new AbortController();
  readonly #observer: SessionObserver;
  #delivered: Lsn = ZERO_LSN;
  #acked: Lsn = ZERO_LSN;
  #closed: Omit<SessionOutcome, "acked"> | undefined;
  /** Settles when the socket is closed and the source let go. */
  readonly done: Promise<void>;

  /** Binds `socket` (from `Deno.upgradeWebSocket`) to `source`. */
  constructor(socket: WebSocket, source: FrameSource, options: SessionOptions) {
    const { observer = {}, expiresAt, monitor } = options;
    this.label = options.label;
    this.#socket = socket;
    this.#source = source;
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
      await source.close();
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
  get outcome(): SessionOutcome {
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
    const stop = () => void this.#source.close();
    signal.addEventListener("abort", stop, { once: true });
    let lastYield = performance.now();
    // Every wait comes before the next read, while no frame is held: a frame held across a wait
    // lives through young-generation collections (the decoder keeps allocating) and is moved to
    // the old generation, where a large transaction's frames piled up until a full collection.
    let frame: OutgoingFrame | undefined;
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
        frame = await this.#source.read();
        if (frame === undefined) break;
        const now = performance.now();
        // A frame that was waited for came through the event loop, which read the acks meanwhile.
        if (now - asked > WAITED_MS) lastYield = now;
        if (socket.readyState !== WebSocket.OPEN) return;
        socket.send(frame.text);
        if (frame.nextLsn > this.#delivered) this.#delivered = frame.nextLsn;
        this.#observer.sent?.(frame);
        frame = undefined;
      }
      this.close(CloseCode.Normal, "stream ended");
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof SourceClosed) {
        if (error.code === CloseCode.TryAgainLater) {
          log.warn("replication.lost", "the replication connection was lost", {
            label: this.label,
            error: errorMessage(error.cause ?? error),
          });
        }
        this.close(error.code, error.message);
      } else {
        log.error("stream.failed", `the stream of ${this.label} failed`, {
          label: this.label,
          error: errorMessage(error),
        });
        this.close(
          CloseCode.InternalError,
          "internal error; reconnect to resume after your last ack",
        );
      }
    } finally {
      signal.removeEventListener("abort", stop);
    }
  }

  #onMessage(event: MessageEvent): void {
    const lsn = readAck(event.data, this.#delivered);
    if (typeof lsn !== "bigint") return this.close(lsn.code, lsn.reason);
    // An ack at or below the last one (say, of a re-delivered frame) changes nothing.
    if (lsn <= this.#acked) return;
    this.#acked = lsn;
    this.#source.acknowledge(lsn);
    this.#observer.acknowledged?.(lsn);
  }

  /** Closes the socket with `code` and `reason` (at most 123 bytes), ending the stream. */
  close(code: CloseCodeValue, reason: string): void {
    this.#closed ??= { code, reason, by: "server" };
    this.#abort.abort();
    closeSocket(this.#socket, code, reason);
  }
}
