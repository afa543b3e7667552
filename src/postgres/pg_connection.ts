/**
 * A dedicated connection for the data paths: `npm:pg` for start-up, TLS
 * (through {@link PgTransport}), authentication and queries, and the
 * transport for `COPY … TO STDOUT` (snapshot export) and the replication
 * stream, whose data it hands over in place. A replication copy also
 * watches its link: at half of `receiveTimeoutMs` without a byte it asks
 * PostgreSQL to answer, at the whole it takes the link for dead.
 * @module
 */

import pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { clientConfig, RAW_TEXT_TYPES } from "./database.ts";
import type { CopyDataHandler, PgTransport } from "./pg_transport.ts";

/** The result of a simple query: its last statement's rows, as text (or null), and command tag. */
export interface QueryResult {
  fields: string[];
  rows: (string | null)[][];
  command: string;
}

/** How a CopyBoth exchange is read. */
export interface CopyBothOptions {
  /** Whether reading may pause a moment after a small read (nothing awaited soon). */
  linger?: () => boolean;
  /** Nothing received for this long: the link is dead (0 or absent: never). */
  receiveTimeoutMs?: number;
  /** Nothing received for half of it: ask PostgreSQL for a reply (a status update asking one). */
  onQuiet?: () => void;
}

/** A running CopyBoth exchange. */
export interface CopyBoth {
  /** Settles when the copy has started: PostgreSQL answered CopyBothResponse, or its error. */
  started: Promise<void>;
  /** Settles when the copy ends: PostgreSQL ended it, or the connection failed. */
  done: Promise<void>;
}

/** One connection to PostgreSQL. One query or copy at a time. */
export class PgConnection {
  readonly #client: pg.Client;
  readonly #transport: PgTransport;
  #closed: Promise<void> | undefined;

  private constructor(client: pg.Client, transport: PgTransport) {
    this.#client = client;
    this.#transport = transport;
  }

  /** Connects as `db` says (a walsender connection for `replication`) and waits until it is ready. */
  static async connect(db: DatabaseConfig, replication = false): Promise<PgConnection> {
    let transport: PgTransport | undefined;
    const client = new pg.Client(
      clientConfig(db, { replication, created: (t) => (transport = t) }),
    );
    client.on("error", () => {}); // a failure surfaces through the query or copy that meets it
    await client.connect();
    return new PgConnection(client, transport!);
  }

  /** Whether the connection is encrypted (TLS). */
  get encrypted(): boolean {
    return this.#transport.encrypted;
  }

  /** Runs `sql` (one or more statements, no parameters) and returns the last statement's rows. */
  async query(sql: string): Promise<QueryResult> {
    const results = await this.#client.query({
      text: sql,
      rowMode: "array",
      types: RAW_TEXT_TYPES,
    } as pg.QueryArrayConfig) as unknown as pg.QueryArrayResult | pg.QueryArrayResult[];
    const last = Array.isArray(results) ? results[results.length - 1] : results;
    return {
      fields: last.fields.map((f: { name: string }) => f.name),
      rows: last.rows as (string | null)[][],
      command: last.rowCount === null ? last.command : `${last.command} ${last.rowCount}`,
    };
  }

  /**
   * Runs `COPY … TO STDOUT` and hands each CopyData payload to `onData` as a
   * view valid only during the call; awaits `onData` when it returns a
   * promise, and reads nothing from PostgreSQL meanwhile (backpressure).
   * Resolves with the command tag (`COPY n`).
   */
  async copyOut(
    sql: string,
    onData: (bytes: Uint8Array) => void | Promise<void>,
  ): Promise<string> {
    void this.#transport.takeCopy(
      0x48,
      (bytes, _view, start, end) => onData(bytes.subarray(start, end)),
    );
    const result = await this.#client.query(sql);
    return `COPY ${result.rowCount ?? 0}`;
  }

  /**
   * Starts a CopyBoth exchange (`START_REPLICATION …` on a replication
   * connection) whose CopyData payloads go to `onData` in place, without
   * awaiting between messages unless it returns a promise (then nothing is
   * read meanwhile).
   */
  copyBoth(sql: string, onData: CopyDataHandler, options: CopyBothOptions = {}): CopyBoth {
    const started = this.#transport.takeCopy(0x57, onData, options.linger);
    const query = this.#client.query(sql);
    const timeout = options.receiveTimeoutMs ?? 0;
    let watch: ReturnType<typeof setInterval> | undefined;
    if (timeout > 0) {
      let askedAfter = -1; // the read after which PostgreSQL was last asked to answer
      watch = setInterval(() => {
        const quiet = Date.now() - this.#transport.lastReceivedAt;
        if (quiet >= timeout) {
          clearInterval(watch);
          this.#transport.destroy(
            new Error(
              `no message from PostgreSQL for ${Math.round(quiet / 1000)} s ` +
                `(REPLICATION_TIMEOUT_SECONDS): the connection is taken for dead`,
            ),
          );
        } else if (quiet >= timeout / 2 && askedAfter !== this.#transport.lastReceivedAt) {
          askedAfter = this.#transport.lastReceivedAt;
          options.onQuiet?.();
        }
      }, Math.max(50, Math.min(1000, timeout / 8)));
    }
    const done = query.then(() => {}).finally(() => clearInterval(watch));
    return {
      started: new Promise<void>((resolve, reject) => {
        void started.then(resolve);
        done.then(() => reject(new Error(`PostgreSQL did not start copying: ${sql}`)), reject);
      }),
      done,
    };
  }

  /** Sends one CopyData message (a standby status update, say), after any sent before it. */
  sendCopyData(payload: Uint8Array): Promise<void> {
    const message = new Uint8Array(5 + payload.length);
    message[0] = 0x64;
    new DataView(message.buffer).setInt32(1, payload.length + 4);
    message.set(payload, 5);
    return new Promise((resolve, reject) =>
      this.#transport.write(message, (error) => (error ? reject(error) : resolve()))
    );
  }

  /** Asks PostgreSQL to cancel what this connection runs now (CancelRequest); never throws. */
  async cancel(): Promise<void> {
    await this.#transport.cancel().catch(() => {});
  }

  /** Ends the session (Terminate) and closes the socket; never throws. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          this.#transport.destroy();
          resolve();
        }, 5000);
      });
      await Promise.race([this.#client.end().catch(() => {}), late]);
      clearTimeout(timer);
    })();
    return this.#closed;
  }

  /** Same as {@link close}, without waiting. */
  [Symbol.dispose](): void {
    void this.close();
  }
}
