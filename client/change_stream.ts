/**
 * A consumer of one stream: v2's `changes` (or `tail`), or a v1 slot. It
 * assembles partial frames into one transaction, hands transactions to the
 * application in order, acknowledges each only after the application's
 * handler for it resolved (at least once, end to end), skips transactions
 * redelivered after a reconnect that were already handled (acknowledging
 * them again), and reconnects with jittered backoff on the retryable close
 * codes. Final close codes end it with a {@link StreamClosedError}.
 * @module
 */

import { type Change, CloseCode, type TransactionFrame } from "../src/protocol.ts";
import { parseLsn } from "../src/lsn.ts";
import { type JsonParser, jsonParser, type NumberMode } from "./exact_json.ts";

/** One committed transaction: its changes (every chunk's, in order) and the position acking it confirms. */
export interface Transaction<C extends Change = Change> {
  /** The transaction's `nextlsn`: acknowledging it confirms this transaction and all before it. */
  lsn: string;
  changes: C[];
}

/** A credential, or a function that returns a fresh one (called again after `4401`). */
export type TokenSource = string | (() => string | Promise<string>);

/** Where a stream is and how to consume it. */
export interface StreamOptions {
  /** The server, e.g. `http://localhost:12312`; a function is asked again on every (re)connect. */
  url: string | URL | (() => string | URL);
  /** A v2 stream's name. */
  stream?: string;
  /** A v1 slot's name (instead of `stream`). */
  slot?: string;
  /**
   * Relay mode: this consumer's id (its own position in the stream's log);
   * default the one the token names (its `consumer` claim, or its `sub`).
   */
  consumer?: string;
  /** Read a v2 stream's `tail`: a copy of what its consumer is sent; never acknowledges. */
  tail?: boolean;
  /** Bearer credential; sent as `access_token` (browsers cannot set websocket headers). */
  token?: TokenSource;
  /** How numbers are parsed: `"string"` or `"bigint"` keep `bigint`/`numeric` values exact. */
  numbers?: NumberMode;
  /**
   * Acknowledge once this many transactions were handled, or `ms` after the
   * first one not acknowledged yet, whichever comes first (default 256 and
   * 20 ms: on a live stream one acknowledgement, and one standby status in
   * the server and in PostgreSQL, per batch instead of per transaction; a
   * crash re-delivers at most that much). `{ transactions: 1 }`: each one.
   */
  ackEvery?: { transactions?: number; ms?: number };
  /** Backoff between reconnects: full jitter up to `maxDelayMs`; give up after `maxAttempts` failures. */
  reconnect?: { initialDelayMs?: number; maxDelayMs?: number; maxAttempts?: number };
  /** A WebSocket class, where there is no global one (Node 20: `ws`). */
  WebSocket?: typeof WebSocket;
  /** Ends the stream. */
  signal?: AbortSignal;
  /** Told when the connection opens, closes or waits to reconnect. */
  onStatus?: (status: StreamStatus) => void;
}

/** What {@link StreamOptions.onStatus} is told. */
export type StreamStatus =
  | { state: "connecting"; attempt: number }
  | { state: "open" }
  | { state: "reconnecting"; code: number; reason: string; delayMs: number }
  | { state: "closed"; code: number; reason: string };

/** Transactions handled before an acknowledgement is sent, by default. */
export const DEFAULT_ACK_TRANSACTIONS = 256;
/** How long a handled transaction waits for its acknowledgement at most, by default. */
export const DEFAULT_ACK_MS = 20;

/** Close codes after which reconnecting cannot help (4401 is final only without a token function). */
export const FINAL_CLOSE_CODES: ReadonlySet<number> = new Set<number>([
  CloseCode.Normal,
  CloseCode.UnsupportedData,
  CloseCode.MessageTooBig,
  CloseCode.SlotDropped,
  CloseCode.InvalidAck,
  CloseCode.DefinitionBroken,
  CloseCode.StreamInvalidated,
  CloseCode.BeyondRetention,
]);

/** The stream ended and will not resume: the server's close code and reason, or why it was refused. */
export class StreamClosedError extends Error {
  /** The websocket close code, or the HTTP status of a refused connection. */
  readonly code: number;
  /** The server's reason. */
  readonly reason: string;

  /** An error for close `code` with `reason`. */
  constructor(code: number, reason: string) {
    super(`Stream closed (${code}): ${reason || "no reason given"}`);
    this.name = "StreamClosedError";
    this.code = code;
    this.reason = reason;
  }
}

/** Compares two `X/Y` positions. */
function after(a: string, b: string | undefined): boolean {
  return b === undefined || parseLsn(a) > parseLsn(b);
}

/** The server's address now (`url` may be a function choosing among instances). */
export function serverUrl(options: Pick<StreamOptions, "url">): URL {
  return new URL(typeof options.url === "function" ? options.url() : options.url);
}

/** The websocket URL of `options`' stream. */
function socketUrl(options: StreamOptions, token: string | undefined): URL {
  const url = serverUrl(options);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (options.stream !== undefined) {
    const which = options.tail ? "tail" : "changes";
    url.pathname = `/v2/streams/${encodeURIComponent(options.stream)}/${which}`;
  } else if (options.slot !== undefined) {
    url.pathname = "/v1/lr/stream";
    url.searchParams.set("slotName", options.slot);
  } else {
    throw new TypeError("Cannot stream: give a stream name (stream) or a v1 slot (slot)");
  }
  if (options.consumer !== undefined) url.searchParams.set("consumer", options.consumer);
  if (token !== undefined) url.searchParams.set("access_token", token);
  return url;
}

/** The current value of `token`. */
async function currentToken(token: TokenSource | undefined): Promise<string | undefined> {
  return typeof token === "function" ? await token() : token;
}

/** Why the server refuses a connection, when it says so over HTTP (v2: the stream's state). */
async function refusal(options: StreamOptions, token: string | undefined): Promise<
  StreamClosedError | undefined
> {
  if (options.stream === undefined) return undefined;
  const url = new URL(`/v2/streams/${encodeURIComponent(options.stream)}`, serverUrl(options));
  try {
    const response = await fetch(url, {
      headers: token === undefined ? {} : { authorization: `Bearer ${token}` },
    });
    const body = await response.json().catch(() => ({}));
    if ([401, 403, 404].includes(response.status)) {
      return new StreamClosedError(response.status, body.error ?? response.statusText);
    }
  } catch { /* unreachable: retry */ }
  return undefined;
}

/**
 * A stream of transactions: iterate it (`for await`) or give it a handler
 * ({@link ChangeStream.run}). Each transaction is acknowledged once the loop
 * body (or handler) for it completed and the next is asked for; one left by
 * `break` or an exception is not acknowledged, and comes again next time.
 */
export class ChangeStream implements AsyncIterable<Transaction>, AsyncDisposable {
  readonly #options: StreamOptions;
  readonly #parse: JsonParser;
  readonly #WebSocket: typeof WebSocket;
  readonly #abort = new AbortController();
  #socket: WebSocket | undefined;
  /** Frames received, not yet read. */
  readonly #queue: string[] = [];
  #wake: (() => void) | undefined;
  /** The close of the current socket, once it came. */
  #closed: { code: number; reason: string; opened: boolean } | undefined;
  #opened = false;
  #attempt = 0;
  /** The last transaction handed out, not yet known to be handled. */
  #inHand: string | undefined;
  /** Highest handled transaction, and highest acknowledged. */
  #handled: string | undefined;
  #acked: string | undefined;
  /** Highest nextlsn received on the current socket: no ack may go beyond it. */
  #received: string | undefined;
  #unacked = 0;
  #ackTimer: ReturnType<typeof setTimeout> | undefined;
  #final: Error | undefined;

  /** A stream as `options` say; it connects on first read. */
  constructor(options: StreamOptions) {
    if ((options.stream === undefined) === (options.slot === undefined)) {
      throw new TypeError("Cannot stream: give exactly one of stream and slot");
    }
    this.#options = options;
    this.#parse = jsonParser(options.numbers);
    const Socket = options.WebSocket ?? globalThis.WebSocket;
    if (Socket === undefined) {
      throw new TypeError("Cannot stream: no WebSocket here; pass options.WebSocket (e.g. ws)");
    }
    this.#WebSocket = Socket;
    options.signal?.addEventListener("abort", () => void this.close(), { once: true });
  }

  /** The last position acknowledged to the server. */
  get acknowledged(): string | undefined {
    return this.#acked;
  }

  /** The next transaction; `undefined` once the stream was closed by {@link close}. */
  async next(): Promise<Transaction | undefined> {
    // Asking for the next transaction means the one in hand was handled.
    if (this.#inHand !== undefined) this.#handledUpTo(this.#inHand);
    this.#inHand = undefined;
    let pending: Change[] = [];
    for (;;) {
      const text = await this.#frame();
      if (text === undefined) {
        // The socket ended: a transaction half received comes again, whole, after the reconnect.
        pending = [];
        if (this.#abort.signal.aborted) return undefined;
        await this.#reconnect();
        continue;
      }
      const frame = this.#parse(text) as TransactionFrame<Change>;
      if (after(frame.nextlsn, this.#received)) this.#received = frame.nextlsn;
      if (frame.partial) {
        for (const change of frame.change) pending.push(change);
        continue;
      }
      const changes = pending.length === 0 ? frame.change : pending.concat(frame.change);
      pending = [];
      if (!after(frame.nextlsn, this.#handled)) {
        // Sent again after a reconnect, and handled already: confirm it again, do not repeat it.
        this.#send(frame.nextlsn);
        continue;
      }
      this.#inHand = frame.nextlsn;
      return { lsn: frame.nextlsn, changes };
    }
  }

  /** Iterates transactions until the stream is closed; a final close code throws. */
  async *[Symbol.asyncIterator](): AsyncIterator<Transaction> {
    for (;;) {
      const tx = await this.next();
      if (tx === undefined) return;
      yield tx;
    }
  }

  /** Calls `handler` for each transaction, acknowledging it once the handler resolved. */
  async run(handler: (tx: Transaction) => unknown): Promise<void> {
    for (;;) {
      const tx = await this.next();
      if (tx === undefined) return;
      await handler(tx);
    }
  }

  /**
   * Marks `tx`, the transaction in hand, handled now: before leaving a loop
   * with `break`, say, which otherwise leaves it unacknowledged.
   */
  acknowledge(tx: Transaction): void {
    if (this.#inHand !== tx.lsn) return;
    this.#inHand = undefined;
    this.#handledUpTo(tx.lsn);
  }

  /** Sends the acknowledgements still batched, then closes the connection. */
  async close(): Promise<void> {
    this.#abort.abort();
    this.#flush();
    const socket = this.#socket;
    this.#wakeUp();
    if (socket === undefined || socket.readyState === this.#WebSocket.CLOSED) return;
    const closed = new Promise((resolve) => socket.addEventListener("close", resolve));
    socket.close(1000);
    await closed;
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #handledUpTo(lsn: string): void {
    this.#handled = lsn;
    if (this.#options.tail) return;
    this.#unacked++;
    const every = this.#options.ackEvery;
    const transactions = every?.transactions ?? DEFAULT_ACK_TRANSACTIONS;
    if (this.#unacked >= transactions) return this.#flush();
    const ms = every?.ms ?? (every?.transactions === undefined ? DEFAULT_ACK_MS : undefined);
    if (ms !== undefined && this.#ackTimer === undefined) {
      this.#ackTimer = setTimeout(() => this.#flush(), ms);
    }
  }

  #flush(): void {
    clearTimeout(this.#ackTimer);
    this.#ackTimer = undefined;
    // Only what was handled; and never past what this socket was sent (after a reconnect, what
    // was handled may not have been sent again yet): every frame it got up to there was handled.
    const handled = this.#handled;
    if (handled === undefined || this.#received === undefined) return;
    const upTo = after(handled, this.#received) ? this.#received : handled;
    if (after(upTo, this.#acked)) this.#send(upTo);
  }

  #send(lsn: string): void {
    if (this.#options.tail) return;
    const socket = this.#socket;
    if (socket?.readyState !== this.#WebSocket.OPEN) return; // resent after the reconnect
    socket.send(JSON.stringify({ lsn }));
    this.#unacked = 0;
    if (after(lsn, this.#acked)) this.#acked = lsn;
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /** The next frame's text; `undefined` when the socket has closed (or was never opened). */
  async #frame(): Promise<string | undefined> {
    if (this.#final !== undefined) throw this.#final;
    if (this.#socket === undefined && !this.#abort.signal.aborted) await this.#connect();
    while (this.#queue.length === 0) {
      if (this.#closed !== undefined || this.#abort.signal.aborted) return undefined;
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    return this.#queue.shift();
  }

  async #connect(): Promise<void> {
    this.#options.onStatus?.({ state: "connecting", attempt: this.#attempt });
    const token = await currentToken(this.#options.token);
    const socket = new this.#WebSocket(socketUrl(this.#options, token).href);
    this.#socket = socket;
    this.#closed = undefined;
    this.#opened = false;
    socket.addEventListener("open", () => {
      this.#opened = true;
      this.#attempt = 0;
      this.#options.onStatus?.({ state: "open" });
    });
    socket.addEventListener("message", (event: MessageEvent) => {
      this.#queue.push(event.data as string);
      if (this.#queue.length === 1) this.#wakeUp();
    });
    socket.addEventListener("close", (event: CloseEvent) => {
      this.#closed = { code: event.code, reason: event.reason, opened: this.#opened };
      this.#wakeUp();
    });
  }

  /** After a close: the final error, or a wait and a new connection. */
  async #reconnect(): Promise<void> {
    const closed = this.#closed ?? { code: 1006, reason: "", opened: false };
    this.#queue.length = 0;
    this.#acked = undefined; // the new socket's position is the server's: ack again there
    this.#received = undefined;
    clearTimeout(this.#ackTimer);
    this.#ackTimer = undefined;
    const { code, reason } = closed;
    const refreshable = code === CloseCode.TokenExpired &&
      typeof this.#options.token === "function";
    let final: Error | undefined;
    if (FINAL_CLOSE_CODES.has(code) || (code === CloseCode.TokenExpired && !refreshable)) {
      final = new StreamClosedError(code, reason);
    } else if (!closed.opened) {
      final = await refusal(this.#options, await currentToken(this.#options.token));
    }
    const limits = this.#options.reconnect ?? {};
    if (final === undefined && ++this.#attempt > (limits.maxAttempts ?? Infinity)) {
      final = new StreamClosedError(
        code,
        `gave up after ${limits.maxAttempts} attempts: ${reason}`,
      );
    }
    if (final !== undefined) {
      this.#final = final;
      // A refused upgrade says why over HTTP (its status and error), not by a close code.
      const told = final instanceof StreamClosedError ? final : { code, reason };
      this.#options.onStatus?.({ state: "closed", code: told.code, reason: told.reason });
      throw final;
    }
    const cap = Math.min(
      limits.maxDelayMs ?? 10_000,
      (limits.initialDelayMs ?? 100) * 2 ** Math.min(this.#attempt - 1, 20),
    );
    const delayMs = refreshable ? 0 : Math.round(Math.random() * cap);
    this.#options.onStatus?.({ state: "reconnecting", code, reason, delayMs });
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, delayMs);
      this.#abort.signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), {
        once: true,
      });
    });
    if (!this.#abort.signal.aborted) await this.#connect();
  }
}

/** Opens a stream as `options` say (it connects on first read). */
export function connectStream(options: StreamOptions): ChangeStream {
  return new ChangeStream(options);
}
