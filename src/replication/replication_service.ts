/**
 * One slot's replication connection as a `ReadableStream` of transaction
 * frames. Bridges `npm:pg-logical-replication` (connection, copy protocol,
 * keepalives) to the pgoutput decoder, and reports to PostgreSQL only what
 * the client acknowledged.
 * @module
 */

import type { Buffer } from "node:buffer";
import type pg from "pg";
import { LogicalReplicationService } from "pg-logical-replication";
import type { DatabaseConfig } from "../config.ts";
import { ConflictError, NotFoundError } from "../errors.ts";
import { SqlState, sqlState, withValueSettings } from "../postgres/database.ts";
import { type Lsn, parseLsn, ZERO_LSN } from "../lsn.ts";
import { standbyStatusUpdate } from "./standby_status.ts";
import {
  type Frame,
  PgoutputDecoder,
  type StreamScope,
  type TypeNameResolver,
} from "./pgoutput_decoder.ts";

/** Bytes (UTF-16 code units) of decoded frames buffered ahead of the socket by default. */
export const DEFAULT_HIGH_WATER_BYTES = 2 << 20;

/** Options of {@link ReplicationService.start}. */
export interface ReplicationOptions {
  database: DatabaseConfig;
  slotName: string;
  publications: string[];
  resolveTypes: TypeNameResolver;
  /** What the stream carries: which relations, columns, rows and kinds of change. */
  scope: StreamScope;
  /** Bytes of frames decoded ahead of the consumer before reading from PostgreSQL pauses. */
  highWaterBytes?: number;
  /** Size at which a large transaction is sent as partial frames. */
  chunkBytes?: number;
}

/** The part of `npm:pg`'s connection that writes CopyData (not in its public types). */
interface CopyConnection {
  sendCopyFromChunk(chunk: Buffer): void;
}

/**
 * Starts replication of `options.slotName`, waiting up to `busyTimeoutSeconds`
 * while PostgreSQL still holds the slot for a walsender that is going away (a
 * client that just dropped, a server that crashed). A {@link NotFoundError}
 * if the slot does not exist, a {@link ConflictError} if it stays busy.
 */
export async function startReplication(
  options: ReplicationOptions,
  busyTimeoutSeconds: number,
): Promise<ReplicationService> {
  const deadline = Date.now() + busyTimeoutSeconds * 1000;
  for (let delay = 50;; delay = Math.min(delay * 2, 500)) {
    try {
      return await ReplicationService.start(options);
    } catch (error) {
      if (error instanceof SlotNotFoundError) throw new NotFoundError(error.message);
      if (!(error instanceof SlotInUseError)) throw error;
      if (Date.now() + delay > deadline) {
        throw new ConflictError(`${error.message}; retry when it has disconnected`);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

/** The slot does not exist. */
export class SlotNotFoundError extends Error {
  /** Creates the error for `slotName`. */
  constructor(slotName: string, options?: ErrorOptions) {
    super(`Cannot stream: slot "${slotName}" does not exist`, options);
    this.name = "SlotNotFoundError";
  }
}

/** Another connection is streaming the slot. */
export class SlotInUseError extends Error {
  /** Creates the error for `slotName`. */
  constructor(slotName: string, options?: ErrorOptions) {
    super(`Cannot stream: slot "${slotName}" is being streamed by another connection`, options);
    this.name = "SlotInUseError";
  }
}

/** The replication connection ended while streaming; reconnecting resumes after the last ack. */
export class ReplicationLostError extends Error {
  /** Creates the error for `slotName`. */
  constructor(slotName: string, options?: ErrorOptions) {
    super(
      `Replication of slot "${slotName}" was interrupted: ${
        (options?.cause as Error)?.message ?? "connection ended"
      }`,
      options,
    );
    this.name = "ReplicationLostError";
  }
}

/**
 * pgoutput without the library's parser: messages pass through as raw
 * buffers to {@link PgoutputDecoder}, which keeps values verbatim. Counts
 * arrivals, so the service knows when every received message was decoded.
 */
class RawPgoutput {
  received = 0;
  /** The replication connection, once started: status updates are written to it directly. */
  client: pg.Client | undefined;
  // The library's AbstractPlugin is not exported; this class has its shape.
  readonly options: { publications: string[] };

  constructor(options: { publications: string[] }) {
    this.options = options;
  }

  get name(): string {
    return "pgoutput";
  }

  start(client: pg.Client, slotName: string): Promise<unknown> {
    this.client = client;
    // Start at 0/0: PostgreSQL resumes from the slot's confirmed_flush_lsn, the last acknowledged
    // position. Names are [a-z0-9_] (checked by the caller and the config), safe to quote.
    const publications = this.options.publications.join(",");
    return client.query(
      `START_REPLICATION SLOT "${slotName}" LOGICAL 0/0 (proto_version '1', publication_names '${publications}')`,
    );
  }

  parse(buffer: Buffer): Buffer {
    this.received++;
    return buffer;
  }
}

/**
 * Streams one slot. `readable` yields committed transactions in commit
 * order; `acknowledge` confirms them to PostgreSQL. Close it (or cancel the
 * stream) to end the replication connection; the slot stays.
 */
export class ReplicationService implements AsyncDisposable {
  readonly slotName: string;
  /** Committed transactions, in order. Errors with {@link ReplicationLostError} if the connection drops. */
  readonly readable: ReadableStream<Frame>;

  readonly #lib: LogicalReplicationService;
  readonly #plugin: RawPgoutput;
  readonly #decoder: PgoutputDecoder;
  #controller!: ReadableStreamDefaultController<Frame>;
  #wake: (() => void) | undefined;
  #processed = 0;
  #closing = false;
  #ended: Promise<void> = Promise.resolve();
  /** nextlsn of the last frame handed to `readable`. */
  #enqueued: Lsn = ZERO_LSN;
  /** Highest position the client acknowledged. */
  #acked: Lsn = ZERO_LSN;
  /** Position reported to PostgreSQL as flushed: the client's ack, or an idle advance past it. */
  #confirmed: Lsn = ZERO_LSN;

  private constructor(options: ReplicationOptions) {
    this.slotName = options.slotName;
    this.#decoder = new PgoutputDecoder(options.resolveTypes, options.scope, options.chunkBytes);
    this.#plugin = new RawPgoutput({ publications: options.publications });
    this.#lib = new LogicalReplicationService(withValueSettings(options.database), {
      // Never acknowledge on the library's own: it would confirm what was only received (data loss).
      acknowledge: { auto: false, timeoutSeconds: 0 },
      // Await our data handler before the next message: that is how backpressure reaches the socket.
      flowControl: { enabled: true },
    });
    this.readable = new ReadableStream<Frame>({
      start: (controller) => {
        this.#controller = controller;
      },
      pull: () => this.#resume(),
      cancel: () => this.close(),
    }, {
      highWaterMark: options.highWaterBytes ?? DEFAULT_HIGH_WATER_BYTES,
      size: (frame) => frame.text.length,
    });
  }

  /**
   * Connects and starts streaming `options.slotName` from its last
   * acknowledged position. Rejects with {@link SlotNotFoundError},
   * {@link SlotInUseError} or the connection's error.
   */
  static async start(options: ReplicationOptions): Promise<ReplicationService> {
    const service = new ReplicationService(options);
    await service.#start();
    return service;
  }

  async #start(): Promise<void> {
    this.#lib.on("error", () => {}); // surfaced through subscribe()'s promise below
    this.#lib.on("data", (_lsn: string, message: Buffer) => this.#onMessage(message));
    this.#lib.on(
      "heartbeat",
      (lsn: string, _time: number, reply: boolean) => this.#onKeepalive(lsn, reply),
    );
    const started = new Promise<void>((resolve) => this.#lib.once("start", () => resolve()));
    const running = this.#lib.subscribe(this.#plugin, this.slotName);
    try {
      await Promise.race([
        started,
        running.then(() => Promise.reject(new Error("replication ended at once"))),
      ]);
    } catch (error) {
      this.#closing = true;
      await this.#lib.stop().catch(() => {});
      switch (sqlState(error)) {
        case SqlState.UndefinedObject:
          throw new SlotNotFoundError(this.slotName, { cause: error });
        case SqlState.ObjectInUse:
          throw new SlotInUseError(this.slotName, { cause: error });
      }
      throw error;
    }
    this.#ended = running.then(
      () => this.#lost(undefined),
      (error) => this.#lost(error),
    );
  }

  #lost(cause: unknown): void {
    if (this.#closing) return;
    this.#closing = true;
    this.#resume();
    try {
      this.#controller.error(new ReplicationLostError(this.slotName, { cause }));
    } catch { /* already closed */ }
    void this.#lib.stop().catch(() => {});
  }

  #resume(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  async #onMessage(message: Buffer): Promise<void> {
    try {
      if (this.#closing) return;
      const result = this.#decoder.decode(message);
      if (result instanceof Promise) {
        await result;
      } else if (result !== undefined) {
        this.#controller.enqueue(result);
        this.#enqueued = result.nextLsn;
        if ((this.#controller.desiredSize ?? 0) <= 0) {
          // Backpressure: the library reads no further message until this resolves.
          await new Promise<void>((resolve) => (this.#wake = resolve));
        }
      }
    } catch (error) {
      this.#lost(error);
    } finally {
      this.#processed++;
    }
  }

  /**
   * A primary keepalive. Answer with the confirmed position when asked (or
   * `wal_sender_timeout` ends the stream); and when the client has
   * acknowledged everything decoded so far and nothing is in flight, move the
   * confirmed position up to the server's WAL end so an idle slot does not
   * hold WAL forever. Safe: every transaction that committed before that
   * position has been sent ahead of this keepalive, decoded and acknowledged.
   */
  #onKeepalive(lsnText: string, reply: boolean): void {
    if (this.#closing) return;
    const walEnd = parseLsn(lsnText);
    const idle = this.#plugin.received === this.#processed && !this.#decoder.inTransaction &&
      this.#acked >= this.#enqueued;
    if (idle && walEnd > this.#confirmed) {
      this.#confirmed = walEnd;
      this.#sendStatus();
    } else if (reply) {
      this.#sendStatus();
    }
  }

  /**
   * The client consumed every transaction up to `lsn` (a delivered nextlsn;
   * the caller validates it). Reported to PostgreSQL at once: an ack the
   * server has received is never lost to a crash of this process.
   */
  acknowledge(lsn: Lsn): void {
    if (lsn <= this.#acked) return;
    this.#acked = lsn;
    if (lsn <= this.#confirmed) return;
    this.#confirmed = lsn;
    this.#sendStatus();
  }

  #sendStatus(): void {
    if (this.#confirmed === ZERO_LSN || this.#closing) return;
    // Not the library's acknowledge(): it reports lsn + 1 and dates the message from a wrong epoch
    // (a week ahead), which shows as a bogus reply_time in pg_stat_replication.
    const connection =
      (this.#plugin.client as unknown as { connection?: CopyConnection } | undefined)?.connection;
    connection?.sendCopyFromChunk(standbyStatusUpdate(this.#confirmed));
  }

  /** Flushes the confirmed position, ends the replication connection and closes `readable`. */
  async close(): Promise<void> {
    this.#closing = true;
    this.#resume();
    try {
      this.#controller.close();
    } catch { /* already closed or errored */ }
    await this.#lib.stop().catch(() => {});
    await this.#ended;
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
