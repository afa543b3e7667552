/**
 * One slot's replication connection as a `ReadableStream` of transaction
 * frames. Speaks the streaming replication protocol itself, on our own wire
 * connection: `START_REPLICATION`, then CopyData in both directions —
 * XLogData and keepalives from PostgreSQL, handed to the pgoutput decoder in
 * place (no copy, no object, no promise per message), and standby status
 * updates back, which report only what the client acknowledged.
 *
 * Protocol: https://www.postgresql.org/docs/current/protocol-replication.html
 * @module
 */

import type { DatabaseConfig } from "../config.ts";
import { ConflictError, NotFoundError } from "../errors.ts";
import { formatLsn, type Lsn, ZERO_LSN } from "../lsn.ts";
import { SqlState, sqlState } from "../postgres/database.ts";
import { PgConnection } from "../postgres/pg_connection.ts";
import { log } from "../observability/log.ts";
import {
  DEFAULT_CHUNK_BYTES,
  type Frame,
  type LogTap,
  PgoutputDecoder,
  type ResumePoint,
  type StreamScope,
  type TypeNameResolver,
} from "./pgoutput_decoder.ts";
import { standbyStatusUpdate } from "./standby_status.ts";

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
  /** A transaction delivered part-way before, whose first changes are not sent again. */
  resume?: ResumePoint;
  /**
   * What reads the log beside the frames (a stream's backfills): it is told
   * of the replication's start, of every acknowledgement, and of its end.
   * Its messages are asked for (`messages 'true'`, PostgreSQL 14+).
   */
  tap?: ReplicationTap;
  /**
   * Nothing received for this long (keepalives included) ends the stream as
   * lost, so that a half-open link is noticed; at half of it PostgreSQL is
   * asked to answer. 0 or absent: never.
   */
  receiveTimeoutMs?: number;
}

/** A {@link LogTap} that lives as long as one replication connection. */
export interface ReplicationTap extends LogTap {
  /** Replication started, sending frames of about `chunkBytes`: what it reads is decoded from now on. */
  start(chunkBytes: number): void;
  /** The client acknowledged every frame up to `lsn`. */
  acknowledged(lsn: Lsn): void;
  /** The replication ended: stop, and let go. */
  close(): Promise<void>;
  /**
   * Asked after each commit: the publications to read from `from` (the
   * commit's end) on, when the change of definition the transaction carried
   * wants kinds of change the walsender was not started for. The replication is then started again
   * there, on a new connection; the consumer sees one stream.
   */
  republish?(): { publications: Promise<string[]>; from: Lsn } | undefined;
}

/** How long a restarted replication waits for the slot its last walsender held. */
const RESTART_BUSY_MS = 30_000;

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
      if (delay === 50) {
        log.info("replication.slot_busy", `${error.message}; waiting for it to be free`, {
          slot: options.slotName,
          waitSeconds: busyTimeoutSeconds,
        });
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

/** CopyData payload tags of the streaming replication protocol. */
const XLOG_DATA = 0x77; // w: start(8) end(8) send time(8), then a pgoutput message
const KEEPALIVE = 0x6b; // k: WAL end(8) send time(8) reply requested(1)
/** The pgoutput message that ends a transaction (after which a restart may begin). */
const PGOUTPUT_COMMIT = 0x43; // C

/**
 * Streams one slot. `readable` yields committed transactions in commit
 * order; `acknowledge` confirms them to PostgreSQL. Close it (or cancel the
 * stream) to end the replication connection; the slot stays.
 */
export class ReplicationService implements AsyncDisposable {
  readonly slotName: string;
  /** Committed transactions, in order. Errors with {@link ReplicationLostError} if the connection drops. */
  readonly readable: ReadableStream<Frame>;

  readonly #options: ReplicationOptions;
  readonly #decoder: PgoutputDecoder;
  #connection: PgConnection | undefined;
  #controller!: ReadableStreamDefaultController<Frame>;
  #wake: (() => void) | undefined;
  #closing = false;
  #ended: Promise<void> = Promise.resolve();
  /** nextlsn of the last frame handed to `readable`. */
  #enqueued: Lsn = ZERO_LSN;
  /** Highest position the client acknowledged. */
  #acked: Lsn = ZERO_LSN;
  /** Position reported to PostgreSQL as flushed: the client's ack, or an idle advance past it. */
  #confirmed: Lsn = ZERO_LSN;
  /** A standby status is queued for the end of this turn. */
  #statusQueued = false;
  /** The tap was started: replication began, and the tap is closed with it. */
  #tapStarted = false;
  /** The publications the walsender reads. */
  #publications: string[];
  /** A restart under way (see {@link #restart}), awaited by {@link close}. */
  #restarting: Promise<void> | undefined;

  private constructor(options: ReplicationOptions) {
    this.slotName = options.slotName;
    this.#options = options;
    this.#publications = options.publications;
    this.#decoder = new PgoutputDecoder(
      options.resolveTypes,
      options.scope,
      options.chunkBytes,
      options.resume,
      options.tap,
    );
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

  /** Starts the walsender from the slot's confirmed position, or (`from`, a restart) from there. */
  async #start(from?: Lsn): Promise<void> {
    const connection = await PgConnection.connect(this.#options.database, true);
    if (this.#closing) {
      await connection.close();
      return;
    }
    this.#connection = connection;
    // From 0/0: PostgreSQL resumes at the slot's confirmed_flush_lsn, the last acknowledged
    // position; from a later position, it skips the transactions that committed before it. Slot
    // and publication names are [a-z0-9_] (checked by the callers), safe to quote.
    const messages = this.#options.tap === undefined ? "" : ", messages 'true'";
    const copy = connection.copyBoth(
      `START_REPLICATION SLOT "${this.slotName}" LOGICAL ${
        formatLsn(from ?? ZERO_LSN)
      } (proto_version '1', publication_names '${this.#publications.join(",")}'${messages})`,
      // Only the current connection is read: one left behind (a restart) may still bring data.
      (bytes, view, start, end) =>
        connection === this.#connection ? this.#onCopyData(bytes, view, start, end) : undefined,
      {
        linger: () => this.#decoder.betweenFrames,
        receiveTimeoutMs: this.#options.receiveTimeoutMs,
        onQuiet: () => this.#sendStatus(true),
      },
    );
    // The end of a copy that started is a loss; not that of one left behind (a restart), nor of
    // one refused (its caller is told).
    let began = false;
    copy.started.then(() => (began = true), () => {});
    this.#ended = copy.done.then(
      () => {
        if (began && connection === this.#connection) this.#lost(undefined);
      },
      (error) => {
        if (began && connection === this.#connection) this.#lost(error);
      },
    );
    try {
      await copy.started;
    } catch (error) {
      if (from === undefined) this.#closing = true;
      this.#connection = undefined;
      void connection.close();
      switch (sqlState(error)) {
        case SqlState.UndefinedObject:
          throw new SlotNotFoundError(this.slotName, { cause: error });
        case SqlState.ObjectInUse:
          throw new SlotInUseError(this.slotName, { cause: error });
      }
      throw error;
    }
    if (from !== undefined) return; // a restart: the tap runs on
    this.#tapStarted = this.#options.tap !== undefined;
    this.#options.tap?.start(this.#options.chunkBytes ?? DEFAULT_CHUNK_BYTES);
  }

  /**
   * Ends the walsender and starts another from `from` (the end of the
   * transaction just decoded) with `publications`: nothing the old one sent
   * after it is read, and the new one sends it again, with what the new
   * publications add. Waits for the slot while the old walsender lets go.
   */
  async #restart(publications: Promise<string[]>, from: Lsn): Promise<void> {
    const old = this.#connection;
    this.#connection = undefined;
    try {
      await old?.close();
      this.#publications = await publications;
      const deadline = Date.now() + RESTART_BUSY_MS;
      for (let delay = 20;; delay = Math.min(delay * 2, 500)) {
        if (this.#closing) return;
        try {
          await this.#start(from);
          break;
        } catch (error) {
          if (!(error instanceof SlotInUseError) || Date.now() + delay > deadline) throw error;
          await new Promise((resolve) => setTimeout(resolve, delay));
        }
      }
      if (this.#closing) return;
      log.info("replication.restarted", `replication of slot "${this.slotName}" started again`, {
        slot: this.slotName,
        from: formatLsn(from),
        publications: this.#publications.join(","),
      });
      // The position acknowledged so far, to the new walsender.
      this.#sendStatus();
    } catch (error) {
      this.#lost(error);
    }
  }

  /** One CopyData payload: XLogData (a pgoutput message) or a keepalive. */
  #onCopyData(
    bytes: Uint8Array,
    view: DataView,
    start: number,
    end: number,
  ): void | Promise<void> {
    if (this.#closing) return;
    const tag = bytes[start];
    if (tag === XLOG_DATA) {
      if (start + 25 >= end) return;
      const result = this.#decoder.decode(bytes, view, start + 25);
      if (result instanceof Promise) return result;
      if (result !== undefined) {
        this.#controller.enqueue(result);
        this.#enqueued = result.nextLsn;
      }
      if (bytes[start + 25] === PGOUTPUT_COMMIT) {
        const again = this.#options.tap?.republish?.();
        if (again !== undefined) {
          this.#restarting = this.#restart(again.publications, again.from);
          return;
        }
      }
      if (result === undefined) return;
      if ((this.#controller.desiredSize ?? 0) <= 0) {
        // Backpressure: nothing more is read from PostgreSQL until the consumer catches up.
        return new Promise<void>((resolve) => (this.#wake = resolve));
      }
    } else if (tag === KEEPALIVE) {
      this.#onKeepalive(view.getBigUint64(start + 1), bytes[start + 17] === 1);
    }
  }

  #lost(cause: unknown): void {
    if (this.#closing) return;
    this.#closing = true;
    this.#resume();
    try {
      this.#controller.error(new ReplicationLostError(this.slotName, { cause }));
    } catch { /* already closed */ }
    void this.#connection?.close();
    // Only a started tap: one whose start failed (the slot busy) is started by the next attempt.
    if (this.#tapStarted) void this.#options.tap?.close();
  }

  #resume(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /**
   * A primary keepalive. Answer with the confirmed position when asked (or
   * `wal_sender_timeout` ends the stream); and when the client has
   * acknowledged everything decoded so far and nothing is in flight, move the
   * confirmed position up to the server's WAL end so an idle slot does not
   * hold WAL forever. Safe: every transaction that committed before that
   * position has been sent ahead of this keepalive (messages are decoded in
   * order, so all of them have been decoded) and acknowledged.
   */
  #onKeepalive(walEnd: Lsn, reply: boolean): void {
    const idle = !this.#decoder.inTransaction && this.#acked >= this.#enqueued;
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
    this.#options.tap?.acknowledged(lsn);
    if (lsn <= this.#confirmed) return;
    this.#confirmed = lsn;
    // Sent once the acks read in this turn of the event loop are taken (a microtask: no timer,
    // no delay), so that acknowledgements arriving together make one standby status.
    if (this.#statusQueued) return;
    this.#statusQueued = true;
    queueMicrotask(() => {
      this.#statusQueued = false;
      this.#sendStatus();
    });
  }

  /** Reports the confirmed position; `reply` asks PostgreSQL to answer at once (a quiet link). */
  #sendStatus(reply = false): void {
    if (this.#closing || (this.#confirmed === ZERO_LSN && !reply)) return;
    this.#connection?.sendCopyData(standbyStatusUpdate(this.#confirmed, Date.now(), reply))
      .catch(() => {});
  }

  /** Ends the replication connection (after the statuses already sent) and closes `readable`. */
  async close(): Promise<void> {
    if (this.#statusQueued) {
      // An acknowledgement of this turn still goes out before the connection ends.
      this.#statusQueued = false;
      this.#sendStatus();
    }
    this.#closing = true;
    this.#resume();
    try {
      this.#controller.close();
    } catch { /* already closed or errored */ }
    await this.#restarting; // it gives up, seeing the replication closed
    await this.#connection?.close();
    await this.#ended;
    if (this.#tapStarted) await this.#options.tap?.close();
  }

  /** Same as {@link close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
