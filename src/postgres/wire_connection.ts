/**
 * A small client of PostgreSQL's frontend/backend protocol (version 3.0) on
 * `Deno.connect`, for the data paths where `npm:pg` costs the most per row:
 * `COPY … TO STDOUT` (snapshot export) and, later, the replication stream.
 * Startup (TLS, a replication connection), authentication (trust, password,
 * md5, SCRAM-SHA-256), the simple query protocol, and COPY out. Backend
 * messages are read from one growing buffer and dispatched by tag; COPY data
 * is handed out as views into it, without a copy or an allocation per row.
 *
 * Message formats: https://www.postgresql.org/docs/current/protocol-message-formats.html
 * @module
 */

import { createHash } from "node:crypto";
import { parse as parseConnectionString } from "pg-connection-string";
import type { DatabaseConfig } from "../config.ts";
import { withValueSettings } from "./database.ts";
import { ScramClient } from "./scram.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Protocol version 3.0, as the startup message carries it. */
const PROTOCOL_VERSION = 196608;
/** The SSLRequest code. */
const SSL_REQUEST = 80877103;
/** A read smaller than this, mid-transaction, is followed by a pause of {@link LINGER_MS}. */
const LINGER_BELOW_BYTES = 32 << 10;
/** How long to let PostgreSQL's output pile up before reading more of a transaction. */
const LINGER_MS = 1;
/** Initial size of the receive buffer; it grows to hold the largest message. */
const INITIAL_BUFFER = 256 << 10;

/** An error PostgreSQL reported (ErrorResponse), with its SQLSTATE as `code`. */
export class PostgresError extends Error {
  /** The SQLSTATE, e.g. `42P01`. */
  readonly code: string;
  /** `ERROR`, `FATAL` or `PANIC`. */
  readonly severity: string;
  /** PostgreSQL's DETAIL, if any. */
  readonly detail?: string;
  /** PostgreSQL's HINT, if any. */
  readonly hint?: string;

  /** Creates the error from the fields of an ErrorResponse. */
  constructor(fields: Map<string, string>) {
    super(fields.get("M") ?? "unknown PostgreSQL error");
    this.name = "PostgresError";
    this.code = fields.get("C") ?? "XX000";
    this.severity = fields.get("V") ?? fields.get("S") ?? "ERROR";
    this.detail = fields.get("D");
    this.hint = fields.get("H");
  }
}

/** The result of a simple query: its last statement's rows, as text (or null), and command tag. */
export interface WireResult {
  fields: string[];
  rows: (string | null)[][];
  command: string;
}

/** Where and how to connect, resolved from a {@link DatabaseConfig} as `npm:pg` resolves it. */
interface Target {
  host: string;
  port: number;
  user: string;
  password?: string;
  database: string;
  options?: string;
  applicationName: string;
  tls: "disable" | "require";
}

function target(db: DatabaseConfig): Target {
  const settled = withValueSettings(db);
  const url: Partial<ReturnType<typeof parseConnectionString>> = db.connectionString
    ? parseConnectionString(db.connectionString)
    : {};
  const sslmode = (url as { sslmode?: string }).sslmode ?? db.sslmode ?? "disable";
  if (sslmode === "no-verify") {
    throw new RangeError(
      "sslmode=no-verify is not supported: certificates are always verified; " +
        "give the CA with DENO_CERT=/path/to/ca.pem",
    );
  }
  return {
    host: url.host || db.host,
    port: Number(url.port || db.port),
    user: url.user || db.user,
    password: url.password ?? db.password,
    database: url.database || db.database,
    options: settled.options,
    applicationName: db.application_name,
    // As npm:pg does: any mode but disable (and allow) means TLS, with the certificate verified.
    tls: sslmode === "disable" || sslmode === "allow" ? "disable" : "require",
  };
}

/** A message: its tag and where its body lies in the receive buffer (valid until the next read). */
interface Message {
  tag: number;
  start: number;
  end: number;
}

/** One connection to PostgreSQL. Not for concurrent use: one query at a time. */
export class WireConnection {
  #conn: Deno.Conn;
  #buffer = new Uint8Array(INITIAL_BUFFER);
  #view = new DataView(this.#buffer.buffer);
  #start = 0;
  #end = 0;
  #closed = false;
  /** The chain of writes in order. */
  #writes: Promise<void> = Promise.resolve();
  /** Server parameters reported at startup (server_version, …). */
  readonly parameters = new Map<string, string>();

  private constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  /** Connects, authenticates and waits until the server is ready for queries. */
  static async connect(db: DatabaseConfig, replication = false): Promise<WireConnection> {
    const to = target(db);
    let conn: Deno.Conn = to.host.startsWith("/")
      ? await Deno.connect({ transport: "unix", path: `${to.host}/.s.PGSQL.${to.port}` })
      : await Deno.connect({ hostname: to.host, port: to.port });
    try {
      if (to.tls === "require") conn = await startTls(conn as Deno.TcpConn, to.host);
      const connection = new WireConnection(conn);
      await connection.#startup(to, replication, to.tls === "require");
      return connection;
    } catch (error) {
      try {
        conn.close();
      } catch { /* closed */ }
      throw error;
    }
  }

  /**
   * Sends the startup message and answers PostgreSQL's authentication
   * requests. A server that asks for the password in cleartext is answered
   * only over TLS, and one that began SCRAM must prove, with its final
   * message, that it knows the password before its AuthenticationOk counts:
   * otherwise a man in the middle could read the password or pose as
   * PostgreSQL.
   */
  async #startup(to: Target, replication: boolean, encrypted: boolean): Promise<void> {
    const params: [string, string][] = [
      ["user", to.user],
      ["database", to.database],
      ["application_name", to.applicationName],
      ["client_encoding", "UTF8"],
    ];
    if (to.options) params.push(["options", to.options]);
    if (replication) params.push(["replication", "database"]);
    const body = params.map(([k, v]) => `${k}\0${v}\0`).join("") + "\0";
    const bytes = encoder.encode(body);
    const message = new Uint8Array(8 + bytes.length);
    const view = new DataView(message.buffer);
    view.setInt32(0, message.length);
    view.setInt32(4, PROTOCOL_VERSION);
    message.set(bytes, 8);
    await this.#write(message);
    let scram: ScramClient | undefined;
    let serverProved = false;
    for (;;) {
      const m = await this.#next();
      switch (m.tag) {
        case 0x52: { // R: Authentication*
          const kind = this.#view.getInt32(m.start);
          if (kind === 0) { // AuthenticationOk
            if (scram !== undefined && !serverProved) {
              throw new Error(
                "PostgreSQL accepted the login without SCRAM's final message, so it never proved " +
                  "it knows the password: refusing the connection (is something in the middle?)",
              );
            }
            break;
          }
          if (kind === 3) { // cleartext password
            if (!encrypted) {
              throw new Error(
                `PostgreSQL asks for the password of user "${to.user}" in cleartext on a ` +
                  "connection that is not encrypted: refusing to send it; use TLS " +
                  "(sslmode=require or stricter) or scram-sha-256 authentication",
              );
            }
            await this.#send(0x70, cString(requirePassword(to)));
          } else if (kind === 5) { // md5, with a 4-byte salt
            const salt = this.#buffer.slice(m.start + 4, m.start + 8);
            const inner = md5Hex(encoder.encode(requirePassword(to) + to.user));
            const outer = md5Hex(concat(encoder.encode(inner), salt));
            await this.#send(0x70, cString(`md5${outer}`));
          } else if (kind === 10) { // SASL: the mechanisms offered
            const offered = decoder.decode(this.#buffer.subarray(m.start + 4, m.end)).split("\0");
            if (!offered.includes(ScramClient.mechanism)) {
              throw new Error(`Unsupported SASL mechanisms: ${offered.filter(Boolean).join(", ")}`);
            }
            scram = new ScramClient(requirePassword(to));
            const first = encoder.encode(scram.first());
            const name = cString(ScramClient.mechanism);
            const out = new Uint8Array(name.length + 4 + first.length);
            out.set(name);
            new DataView(out.buffer).setInt32(name.length, first.length);
            out.set(first, name.length + 4);
            await this.#send(0x70, out);
          } else if (kind === 11) { // SASLContinue
            if (scram === undefined) {
              throw new Error("PostgreSQL continued a SASL exchange never begun");
            }
            const serverFirst = decoder.decode(this.#buffer.subarray(m.start + 4, m.end));
            await this.#send(0x70, encoder.encode(await scram.final(serverFirst)));
          } else if (kind === 12) { // SASLFinal: the server's signature, its proof
            if (scram === undefined) {
              throw new Error("PostgreSQL ended a SASL exchange never begun");
            }
            scram.verify(decoder.decode(this.#buffer.subarray(m.start + 4, m.end)));
            serverProved = true;
          } else {
            throw new Error(`Unsupported authentication request ${kind} from PostgreSQL`);
          }
          break;
        }
        case 0x53: { // S: ParameterStatus
          const [name, value] = decoder.decode(this.#buffer.subarray(m.start, m.end)).split("\0");
          this.parameters.set(name, value);
          break;
        }
        case 0x45: // E: ErrorResponse
          throw this.#error(m);
        case 0x5a: // Z: ReadyForQuery
          return;
        default: // K: BackendKeyData, N: NoticeResponse, v: NegotiateProtocolVersion
      }
    }
  }

  /** Runs `sql` (one or more statements, no parameters) and returns the last statement's rows. */
  async query(sql: string): Promise<WireResult> {
    await this.#send(0x51, cString(sql));
    const result: WireResult = { fields: [], rows: [], command: "" };
    let failure: PostgresError | undefined;
    for (;;) {
      const m = await this.#next();
      switch (m.tag) {
        case 0x54: // T: RowDescription
          result.fields = this.#fieldNames(m);
          result.rows = [];
          break;
        case 0x44: // D: DataRow
          result.rows.push(this.#dataRow(m));
          break;
        case 0x43: // C: CommandComplete
          result.command = decoder.decode(this.#buffer.subarray(m.start, m.end - 1));
          break;
        case 0x45: // E: ErrorResponse; ReadyForQuery follows
          failure = this.#error(m);
          break;
        case 0x48: // H: CopyOutResponse, to a query() that should have been copyOut()
        case 0x47: // G: CopyInResponse
        case 0x57: // W: CopyBothResponse
          throw new Error("query() cannot run COPY; use copyOut()");
        case 0x5a: // Z: ReadyForQuery
          if (failure) throw failure;
          return result;
        default: // I: EmptyQueryResponse, N: NoticeResponse, S: ParameterStatus
      }
    }
  }

  /**
   * Runs `COPY … TO STDOUT` and hands each CopyData payload to `onData` as a
   * view that is valid only during the call; awaits `onData` when it returns
   * a promise, and reads nothing from PostgreSQL meanwhile (backpressure).
   * Resolves with the command tag (`COPY n`).
   */
  async copyOut(
    sql: string,
    onData: (bytes: Uint8Array) => void | Promise<void>,
  ): Promise<string> {
    await this.#send(0x51, cString(sql));
    let command = "";
    let failure: PostgresError | undefined;
    for (;;) {
      // Every whole message in the buffer, without awaiting between them unless onData asks to.
      let m = this.#take();
      while (m !== undefined) {
        if (m.tag === 0x64) { // d: CopyData
          const pending = onData(this.#buffer.subarray(m.start, m.end));
          if (pending !== undefined) await pending;
        } else if (m.tag === 0x43) { // C: CommandComplete
          command = decoder.decode(this.#buffer.subarray(m.start, m.end - 1));
        } else if (m.tag === 0x45) { // E: ErrorResponse
          failure = this.#error(m);
        } else if (m.tag === 0x5a) { // Z: ReadyForQuery
          if (failure) throw failure;
          return command;
        } // H: CopyOutResponse, c: CopyDone, N: NoticeResponse
        m = this.#take();
      }
      await this.#fill();
    }
  }

  /**
   * Starts a CopyBoth exchange (`START_REPLICATION …` on a replication
   * connection): resolves once PostgreSQL answers CopyBothResponse, rejects
   * with its error (a slot that does not exist, one in use) otherwise.
   */
  async startCopyBoth(sql: string): Promise<void> {
    await this.#send(0x51, cString(sql));
    let failure: PostgresError | undefined;
    for (;;) {
      const m = await this.#next();
      if (m.tag === 0x57) return; // W: CopyBothResponse
      if (m.tag === 0x45) failure = this.#error(m); // E: ErrorResponse; ReadyForQuery follows
      if (m.tag === 0x5a) throw failure ?? new Error(`PostgreSQL did not start copying: ${sql}`);
    }
  }

  /**
   * Reads the CopyBoth exchange: hands each CopyData payload to `onData` as
   * `bytes[start, end)` (valid only during the call; `view` over the same
   * bytes), without awaiting between messages unless `onData` returns a
   * promise, and reading nothing from PostgreSQL meanwhile (backpressure).
   * Resolves when PostgreSQL ends the copy; rejects if the connection fails.
   */
  async readCopyData(
    onData: (bytes: Uint8Array, view: DataView, start: number, end: number) => void | Promise<void>,
    options: { linger?: () => boolean } = {},
  ): Promise<void> {
    let failure: PostgresError | undefined;
    for (let lastRead = Infinity;;) {
      let m = this.#take();
      while (m !== undefined) {
        if (m.tag === 0x64) { // d: CopyData
          const pending = onData(this.#buffer, this.#view, m.start, m.end);
          if (pending !== undefined) await pending;
        } else if (m.tag === 0x45) { // E: ErrorResponse
          failure = this.#error(m);
        } else if (m.tag === 0x5a) { // Z: ReadyForQuery: the copy is over
          if (failure) throw failure;
          return;
        } // c: CopyDone, C: CommandComplete, N: NoticeResponse
        m = this.#take();
      }
      // A consumer faster than PostgreSQL would read its output a message or two at a time, paying a
      // read per message; where the caller says nothing is awaited soon (a backlog, a large
      // transaction), let a small read's successors pile up for a moment instead.
      if (lastRead < LINGER_BELOW_BYTES && options.linger?.()) {
        await new Promise((resolve) => setTimeout(resolve, LINGER_MS));
      }
      lastRead = await this.#fill();
    }
  }

  /** Sends one CopyData message (a standby status update, say), after any sent before it. */
  sendCopyData(payload: Uint8Array): Promise<void> {
    return this.#send(0x64, payload);
  }

  /** Ends the session (Terminate) once everything sent before is written, and closes the socket; never throws. */
  close(): Promise<void> {
    if (this.#closed) return this.#writes;
    this.#closed = true;
    const done = this.#writes.then(() => this.#conn.write(new Uint8Array([0x58, 0, 0, 0, 4])))
      .catch(() => {})
      .finally(() => {
        try {
          this.#conn.close();
        } catch { /* closed */ }
      });
    this.#writes = done.then(() => {});
    return this.#writes;
  }

  /** Same as {@link close}, without waiting. */
  [Symbol.dispose](): void {
    void this.close();
  }

  #fieldNames(m: Message): string[] {
    const count = this.#view.getInt16(m.start);
    const names: string[] = [];
    let pos = m.start + 2;
    for (let i = 0; i < count; i++) {
      const end = this.#buffer.indexOf(0, pos);
      names.push(decoder.decode(this.#buffer.subarray(pos, end)));
      pos = end + 1 + 18; // table oid, column number, type oid, size, modifier, format
    }
    return names;
  }

  #dataRow(m: Message): (string | null)[] {
    const count = this.#view.getInt16(m.start);
    const row: (string | null)[] = new Array(count);
    let pos = m.start + 2;
    for (let i = 0; i < count; i++) {
      const length = this.#view.getInt32(pos);
      pos += 4;
      if (length < 0) {
        row[i] = null;
      } else {
        row[i] = decoder.decode(this.#buffer.subarray(pos, pos + length));
        pos += length;
      }
    }
    return row;
  }

  #error(m: Message): PostgresError {
    const fields = new Map<string, string>();
    let pos = m.start;
    while (pos < m.end && this.#buffer[pos] !== 0) {
      const end = this.#buffer.indexOf(0, pos + 1);
      fields.set(
        String.fromCharCode(this.#buffer[pos]),
        decoder.decode(this.#buffer.subarray(pos + 1, end)),
      );
      pos = end + 1;
    }
    return new PostgresError(fields);
  }

  /** The next whole message in the buffer, or undefined if more must be read. */
  #take(): Message | undefined {
    const available = this.#end - this.#start;
    if (available < 5) return undefined;
    const length = this.#view.getInt32(this.#start + 1);
    if (available < length + 1) return undefined;
    const tag = this.#buffer[this.#start];
    const start = this.#start + 5;
    this.#start += length + 1;
    return { tag, start, end: start + length - 4 };
  }

  /** The next message, reading as needed. */
  async #next(): Promise<Message> {
    for (;;) {
      const m = this.#take();
      if (m !== undefined) return m;
      await this.#fill();
    }
  }

  /** Reads more bytes: compacts the buffer, grows it for a message larger than it, then reads; returns how many. */
  async #fill(): Promise<number> {
    if (this.#start > 0) {
      this.#buffer.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    const needed = this.#end >= 5 ? this.#view.getInt32(1) + 1 : 0;
    if (needed > this.#buffer.length || this.#end === this.#buffer.length) {
      const grown = new Uint8Array(Math.max(needed, this.#buffer.length * 2));
      grown.set(this.#buffer.subarray(0, this.#end));
      this.#buffer = grown;
      this.#view = new DataView(grown.buffer);
    }
    const read = await this.#conn.read(this.#buffer.subarray(this.#end));
    if (read === null) throw new Error("Connection terminated: PostgreSQL closed the connection");
    this.#end += read;
    return read;
  }

  #send(tag: number, body: Uint8Array): Promise<void> {
    const message = new Uint8Array(5 + body.length);
    message[0] = tag;
    new DataView(message.buffer).setInt32(1, body.length + 4);
    message.set(body, 5);
    return this.#write(message);
  }

  /** Writes `bytes` after every earlier write: writes never interleave. */
  #write(bytes: Uint8Array): Promise<void> {
    const write = this.#writes.then(async () => {
      for (let at = 0; at < bytes.length;) at += await this.#conn.write(bytes.subarray(at));
    });
    this.#writes = write.catch(() => {});
    return write;
  }
}

async function startTls(conn: Deno.TcpConn, hostname: string): Promise<Deno.Conn> {
  const request = new Uint8Array(8);
  new DataView(request.buffer).setInt32(0, 8);
  new DataView(request.buffer).setInt32(4, SSL_REQUEST);
  await conn.write(request);
  const answer = new Uint8Array(1);
  if (await conn.read(answer) !== 1 || answer[0] !== 0x53 /* S */) {
    throw new Error("PostgreSQL does not accept TLS connections, but sslmode requires TLS");
  }
  return await Deno.startTls(conn, { hostname });
}

function requirePassword(to: Target): string {
  if (to.password === undefined) {
    throw new Error(`PostgreSQL asks for a password for user "${to.user}": set PGPASSWORD`);
  }
  return to.password;
}

function cString(text: string): Uint8Array {
  return encoder.encode(`${text}\0`);
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function md5Hex(bytes: Uint8Array): string {
  return createHash("md5").update(bytes).digest("hex");
}
