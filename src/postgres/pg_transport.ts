/**
 * The socket under every `npm:pg` connection of the server (pg's `stream`
 * option), so that all of them — pool, replication, snapshot holder,
 * exports, the relay's lock connection — connect the same way, as libpq
 * would:
 *
 * - **Where**: TCP, or a Unix socket when the host is a directory.
 * - **TLS by `sslmode`**, negotiated here (pg is told `ssl: false` and
 *   sees a plain stream): `disable`; `allow` (plain, and TLS if the server
 *   refuses that); `prefer` (TLS if the server has it); `require` (TLS, the
 *   certificate not checked — unless `sslrootcert` is given, then as
 *   `verify-ca`); `verify-ca` (the chain); `verify-full` (the chain and the
 *   host name). Client certificates; `sslnegotiation=direct`.
 * - **Authentication that never gives the password away**: a cleartext
 *   password request on an unencrypted connection, and an AuthenticationOk
 *   after a SCRAM exchange without the server's final message (its proof
 *   that it knows the password; pg checks the proof itself), fail the
 *   connection before pg sees them.
 * - **Keepalives** on the TCP socket, and **CancelRequest** (the backend's
 *   key is kept as it passes).
 * - **COPY data in place**: every message is framed here; pg gets whole
 *   messages, except, during a copy it was asked to take
 *   ({@link PgTransport.takeCopy}), the CopyData, which go to the caller as
 *   views into the bytes read (no copy, no object per message), with
 *   backpressure per message.
 *
 * Message formats: https://www.postgresql.org/docs/current/protocol-message-formats.html
 * @module
 */

import { Buffer } from "node:buffer";
import { EventEmitter } from "node:events";
import net from "node:net";
import tls from "node:tls";
import {
  type DatabaseConfig,
  type DatabaseHost,
  describeHost,
  type SessionAttrs,
  type SslMode,
} from "../config.ts";
import { log } from "../observability/log.ts";

/** The SSLRequest and CancelRequest codes. */
const SSL_REQUEST = 80877103;
const CANCEL_REQUEST = 80877102;
/** Message tags this module looks at. */
const TAG_AUTH = 0x52; // R
const TAG_KEY_DATA = 0x4b; // K
const TAG_ERROR = 0x45; // E
const TAG_COPY_DATA = 0x64; // d
const TAG_READY = 0x5a; // Z
/** Authentication request codes. */
const AUTH_OK = 0;
const AUTH_CLEARTEXT = 3;
const AUTH_SASL = 10;
const AUTH_SASL_FINAL = 12;
/** A read smaller than this, mid-copy, may be followed by a pause of {@link LINGER_MS}. */
const LINGER_BELOW_BYTES = 32 << 10;
/** How long to let PostgreSQL's output pile up before reading more of a copy. */
const LINGER_MS = 1;

/** Receives one CopyData payload, `bytes[start, end)` (`view` over the same bytes), valid during the call. */
export type CopyDataHandler = (
  bytes: Uint8Array,
  view: DataView,
  start: number,
  end: number,
) => void | Promise<void>;

/** What a copy taken from pg gets: its data, and its start (CopyBoth or CopyOut response). */
interface Copy {
  /** `W` (CopyBothResponse) or `H` (CopyOutResponse): where the copy's data begin. */
  trigger: number;
  onData: CopyDataHandler;
  started: () => void;
  /** Copying: the trigger came. */
  active: boolean;
  /** Whether nothing is awaited soon, so that reading may pause a moment after a small read. */
  linger?: () => boolean;
}

/** A message's bytes are kept where they were read: `bytes[at, at + size)`. */
interface Pending {
  chunk: Uint8Array;
  at: number;
}

/** How the TLS of a connection is set up: node:tls's options, and what to say when it fails. */
function tlsOptions(db: DatabaseConfig, mode: SslMode, host: string): tls.ConnectionOptions {
  const options: tls.ConnectionOptions = { host };
  if (!host.startsWith("/") && net.isIP(host) === 0) options.servername = host;
  const root = db.sslrootcert;
  const verifyChain = mode === "verify-ca" || mode === "verify-full" ||
    (mode === "require" && root !== undefined);
  if (!verifyChain) {
    options.rejectUnauthorized = false;
  } else {
    if (root !== undefined && root !== "system") options.ca = Deno.readTextFileSync(root);
    // Without a file (or with "system"): the runtime's roots (Mozilla's, DENO_CERT, or the OS's
    // with DENO_TLS_CA_STORE=system).
    if (mode !== "verify-full") options.checkServerIdentity = () => undefined;
  }
  if (db.sslcert !== undefined) options.cert = Deno.readTextFileSync(db.sslcert);
  if (db.sslkey !== undefined) options.key = Deno.readTextFileSync(db.sslkey);
  if (db.sslnegotiation === "direct") options.ALPNProtocols = ["postgresql"];
  return options;
}

/** Why a TLS connection failed, in the operator's terms: the mode, the CA file, the reason. */
function tlsFailure(db: DatabaseConfig, mode: SslMode, where: string, error: Error): Error {
  const code = (error as { code?: string }).code ?? "";
  const certificate = /CERT|SELF_SIGNED|UNABLE_TO|ERR_TLS_CERT|certificate/i.test(
    `${code} ${error.message}`,
  );
  const root = db.sslrootcert === undefined
    ? "the runtime's trusted roots (set sslrootcert to your provider's CA file)"
    : db.sslrootcert === "system"
    ? "the system's trusted roots (sslrootcert=system)"
    : `the CA certificate in sslrootcert=${db.sslrootcert}`;
  const message = certificate
    ? `the server's TLS certificate was refused under sslmode=${mode}: it is not ${
      /name|altname|identity|Hostname/i.test(error.message)
        ? `issued for "${where.replace(/:\d+$/, "")}"`
        : `signed by ${root}`
    } (${error.message})`
    : `TLS failed under sslmode=${mode}: ${error.message}`;
  return Object.assign(new Error(`Cannot connect to PostgreSQL at ${where}: ${message}`), {
    code: "ETLS",
    cause: error,
  });
}

/** One connection's socket, as pg's Connection uses it (a net.Socket-like event emitter). */
export class PgTransport extends EventEmitter {
  /** pg checks it before writing. */
  writable = false;
  destroyed = false;
  /** Whether the connection is encrypted. */
  encrypted = false;
  /** The backend's process id and cancel key (BackendKeyData), once known. */
  backendKey: { pid: number; secret: number } | undefined;

  readonly #db: DatabaseConfig;
  #socket: net.Socket | undefined;
  /** The TCP (or Unix) socket under TLS, for keepalives. */
  #raw: net.Socket | undefined;
  #path: string | undefined;
  #host = "";
  #port = 0;
  /** The hosts to try, the next one's index, what each tried one said, and what must fit. */
  #candidates: DatabaseHost[] = [];
  #next = 0;
  readonly #tried: string[] = [];
  #attrs: SessionAttrs = "any";
  /**
   * After AuthenticationOk, while `target_session_attrs` is being judged:
   * the messages pg gets once this host fits (copies), and what the server
   * reported of itself.
   */
  readonly #held: Uint8Array[] = [];
  readonly #reported = new Map<string, string>();
  /** pg's first write, the startup message: sent again when `allow` retries over TLS. */
  #startup: Uint8Array | undefined;
  /** Before the first authentication request, under `allow`: a refusal retries over TLS. */
  #mayRetryEncrypted = false;
  #sasl = false;
  #saslFinal = false;
  #authenticated = false;
  /** Between AuthenticationOk and ReadyForQuery, when the host is to be judged. */
  #judging = false;
  #keepAlive: [boolean, number] | undefined;
  /** The bytes of a message that straddles socket reads, and how many of them are here. */
  #partial = new Uint8Array(64 << 10);
  #partialLength = 0;
  #copy: Copy | undefined;
  /** Where reading stopped while a CopyData handler's promise is pending. */
  #paused: Pending | undefined;

  /** A socket for a connection as `db` says (TLS, certificates, keepalives). */
  constructor(db: DatabaseConfig) {
    super();
    this.#db = db;
  }

  /** As net.Socket's: pg connects with `(port, host)`, or `(path)` for a Unix socket. */
  /**
   * As net.Socket's, but where to is the settings' business, not pg's: each
   * host of `hosts` in turn (shuffled under `load_balance_hosts=random`),
   * the first that answers and fits `target_session_attrs` kept.
   */
  connect(_portOrPath?: number | string, _host?: string): this {
    const hosts = [...(this.#db.hosts ?? [{ host: this.#db.host, port: this.#db.port }])];
    if (this.#db.loadBalanceHosts) {
      for (let i = hosts.length - 1; i > 0; i--) {
        const j = Math.floor(Math.random() * (i + 1));
        [hosts[i], hosts[j]] = [hosts[j], hosts[i]];
      }
    }
    this.#candidates = hosts;
    this.#attrs = this.#db.targetSessionAttrs ?? "any";
    void this.#nextHost();
    return this;
  }

  /** Tries the next candidate host; the first whose socket opens is announced to pg (`connect`). */
  async #nextHost(): Promise<void> {
    for (;;) {
      const target = this.#candidates[this.#next++];
      if (target === undefined) {
        // prefer-standby: no standby answered, so any host will do, from the first again.
        if (this.#attrs === "prefer-standby") {
          this.#attrs = "any";
          this.#next = 0;
          continue;
        }
        return this.#fail(this.#noHostFits());
      }
      this.#host = target.host;
      this.#port = target.port;
      this.#path = target.host.startsWith("/")
        ? `${target.host}/.s.PGSQL.${target.port}`
        : undefined;
      this.#sasl = false;
      this.#saslFinal = false;
      this.#authenticated = false;
      this.#held.length = 0;
      this.#partialLength = 0;
      try {
        await this.#open(this.#db.sslmode ?? "prefer");
      } catch (error) {
        this.#tried.push(`${this.where}: ${(error as Error).message}`);
        if (this.#candidates.length === 1) return this.#fail(error as Error);
        continue;
      }
      if (this.destroyed) return;
      if (!this.writable) {
        this.writable = true;
        this.emit("connect"); // pg sends its startup message now
      } else {
        this.#socket!.write(this.#startup!); // another host: the same startup message
      }
      return;
    }
  }

  /** Why no host would do, each one's reason. */
  #noHostFits(): Error {
    return Object.assign(
      new Error(
        `Cannot connect to PostgreSQL: no host fits target_session_attrs=${
          this.#db.targetSessionAttrs ?? "any"
        }: ${this.#tried.join("; ")}`,
      ),
      { code: "ENOHOST" },
    );
  }

  /** `host:port`, or the socket's path: where this connects, for messages. */
  get where(): string {
    return describeHost({ host: this.#host, port: this.#port });
  }

  /** A plain socket to the server, connected. */
  #dial(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = this.#path !== undefined
        ? net.connect({ path: this.#path })
        : net.connect({ host: this.#host, port: this.#port });
      socket.setNoDelay(true);
      const failed = (error: Error) => reject(error);
      socket.once("error", failed);
      socket.once("connect", () => {
        socket.off("error", failed);
        resolve(socket);
      });
    });
  }

  /** Connects with TLS as `mode` says, trying plain first or as a fallback where it allows. */
  async #open(mode: SslMode): Promise<void> {
    const raw = await this.#dial();
    this.#raw = raw;
    if (mode === "disable" || mode === "allow") {
      this.#mayRetryEncrypted = mode === "allow";
      return this.#attach(raw);
    }
    if (this.#db.sslnegotiation !== "direct") {
      const answer = await sslRequest(raw);
      if (answer !== "S") {
        if (mode === "prefer") return this.#attach(raw);
        raw.destroy();
        throw Object.assign(
          new Error(
            `Cannot connect to PostgreSQL at ${this.where}: it does not accept TLS, ` +
              `but sslmode=${mode} requires it`,
          ),
          { code: "ETLS" },
        );
      }
    }
    this.#attach(await this.#startTls(raw, mode));
  }

  /** TLS over `raw`; the failure said in the operator's terms. */
  #startTls(raw: net.Socket, mode: SslMode): Promise<tls.TLSSocket> {
    let options: tls.ConnectionOptions;
    try {
      options = { ...tlsOptions(this.#db, mode, this.#host), socket: raw };
    } catch (error) {
      raw.destroy();
      return Promise.reject(
        new Error(
          `Cannot connect to PostgreSQL at ${this.where}: cannot read a TLS file: ${
            (error as Error).message
          }`,
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const secure = tls.connect(options);
      const failed = (error: Error) => {
        secure.destroy();
        reject(tlsFailure(this.#db, mode, this.where, error));
      };
      secure.once("error", failed);
      secure.once("secureConnect", () => {
        secure.off("error", failed);
        this.encrypted = true;
        resolve(secure);
      });
    });
  }

  #attach(socket: net.Socket): void {
    this.#socket = socket;
    if (this.#keepAlive !== undefined) this.setKeepAlive(...this.#keepAlive);
    socket.on("data", (chunk: Uint8Array) => this.#received(chunk));
    socket.on("error", (error: Error) => this.#fail(error));
    socket.on("close", () => this.#closed(socket));
  }

  #closed(socket: net.Socket): void {
    if (socket !== this.#socket || this.destroyed) return;
    // A server that ends the session while its host is judged (a FATAL error): pg reads why.
    for (const held of this.#held.splice(0)) this.#toPg(held);
    this.destroyed = true;
    this.writable = false;
    this.emit("close");
  }

  #fail(error: Error): void {
    if (this.destroyed) return;
    this.emit("error", error);
    this.destroy();
  }

  /** When bytes last arrived (ms since the epoch): a quiet replication link is watched by it. */
  lastReceivedAt = Date.now();

  /** One read from the socket. */
  #received(chunk: Uint8Array): void {
    this.lastReceivedAt = Date.now();
    this.#read(chunk, 0);
    // Mid-copy, a small read whose successors are not awaited soon (a backlog, a large
    // transaction): let them pile up for a moment rather than pay a read for each message.
    const copy = this.#copy;
    if (
      copy?.active && this.#paused === undefined && chunk.length < LINGER_BELOW_BYTES &&
      copy.linger?.()
    ) {
      this.#socket?.pause();
      setTimeout(() => {
        if (this.#paused === undefined) this.#socket?.resume();
      }, LINGER_MS);
    }
  }

  /** Reads `chunk` from `at`: whole messages framed in place, a straddling one kept. */
  #read(chunk: Uint8Array, at: number): void {
    if (this.destroyed) return;
    // First the message begun in an earlier read, completed from this one.
    if (this.#partialLength > 0) {
      const have = this.#partialLength;
      const needed = have < 5 ? 5 - have : messageSize(this.#partial) - have;
      const take = Math.min(needed, chunk.length - at);
      this.#keep(chunk, at, take);
      at += take;
      if (take < needed) return; // still not whole
      if (have < 5) return this.#read(chunk, at); // the header is whole: now its body
      const whole = this.#partial.subarray(0, this.#partialLength);
      this.#partialLength = 0;
      const pending = this.#message(whole);
      if (pending === "stop") return;
      if (pending !== undefined) return this.#pause(pending, chunk, at);
    }
    let view: DataView | undefined;
    let run = at; // start of the whole messages not handed to pg yet
    while (chunk.length - at >= 5) {
      view ??= new DataView(chunk.buffer, chunk.byteOffset, chunk.byteLength);
      const size = view.getInt32(at + 1) + 1;
      if (chunk.length - at < size) break;
      const tag = chunk[at];
      if (this.#copy?.active && tag === TAG_COPY_DATA) {
        if (run < at) this.#toPg(chunk.subarray(run, at));
        const pending = this.#copy.onData(chunk, view, at + 5, at + size);
        at += size;
        run = at;
        if (pending !== undefined) return this.#pause(pending, chunk, at);
        continue;
      }
      const verdict = this.#inspect(view, at, tag);
      if (verdict === "stop") return;
      if (verdict === "hold") {
        if (run < at) this.#toPg(chunk.subarray(run, at));
        const held = chunk.slice(at, at + size);
        at += size;
        run = at;
        if (!this.#hold(held, tag)) return;
        continue;
      }
      at += size;
      if (this.#copy !== undefined && (tag === this.#copy.trigger || tag === TAG_READY)) {
        // The copy starts (or a failure ended it): what follows is its data, or pg's again.
        this.#toPg(chunk.subarray(run, at));
        run = at;
        this.#switchCopy(tag);
      }
    }
    if (run < at) this.#toPg(chunk.subarray(run, at));
    if (at < chunk.length) this.#keep(chunk, at, chunk.length - at);
  }

  /**
   * One whole message that straddled reads, `bytes` (in the straddle buffer,
   * which nothing overwrites before the copy's handler returns or its promise
   * settles): to the copy in place, or to pg as a copy (pg may keep it).
   */
  #message(bytes: Uint8Array): Promise<void> | "stop" | void {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const tag = bytes[0];
    if (this.#copy?.active && tag === TAG_COPY_DATA) {
      return this.#copy.onData(bytes, view, 5, bytes.length);
    }
    const verdict = this.#inspect(view, 0, tag);
    if (verdict === "stop") return "stop";
    if (verdict === "hold") return this.#hold(bytes.slice(), tag) ? undefined : "stop";
    this.#toPg(Buffer.from(bytes));
    if (this.#copy !== undefined && (tag === this.#copy.trigger || tag === TAG_READY)) {
      this.#switchCopy(tag);
    }
  }

  #switchCopy(tag: number): void {
    const copy = this.#copy!;
    if (tag === TAG_READY) {
      this.#copy = undefined; // the copy is over (or never began: pg reports the error)
    } else if (!copy.active) {
      copy.active = true;
      copy.started();
    }
  }

  /** Keeps `chunk[at, at + count)` as (part of) the straddling message. */
  #keep(chunk: Uint8Array, at: number, count: number): void {
    const size = this.#partialLength + count;
    if (size > this.#partial.length) {
      const grown = new Uint8Array(Math.max(size, this.#partial.length * 2));
      grown.set(this.#partial.subarray(0, this.#partialLength));
      this.#partial = grown;
    }
    this.#partial.set(chunk.subarray(at, at + count), this.#partialLength);
    this.#partialLength = size;
  }

  /** Backpressure: nothing more is read until the handler's promise settles. */
  #pause(pending: Promise<void>, chunk: Uint8Array, at: number): void {
    this.#socket?.pause();
    this.#paused = { chunk, at };
    pending.then(() => {
      const paused = this.#paused;
      this.#paused = undefined;
      if (paused !== undefined) this.#read(paused.chunk, paused.at);
      if (this.#paused === undefined) this.#socket?.resume();
    }, (error) => this.#fail(error instanceof Error ? error : new Error(String(error))));
  }

  /**
   * Looks at a message before pg does: keeps the backend's key, refuses an
   * authentication that would give the password away or skip the server's
   * proof, and, under `allow`, retries a refused plain connection over TLS.
   * False when the connection was failed (or is being retried) instead.
   */
  #inspect(view: DataView, at: number, tag: number): "pass" | "hold" | "stop" {
    if (this.#judging) {
      if (tag === 0x53) { // S: ParameterStatus, name\0value\0
        const body = new Uint8Array(
          view.buffer,
          view.byteOffset + at + 5,
          view.getInt32(at + 1) - 4,
        );
        const [name, value] = new TextDecoder().decode(body).split("\0");
        this.#reported.set(name, value);
      }
    }
    if (this.#authenticated) {
      if (tag === TAG_KEY_DATA) {
        this.backendKey = { pid: view.getInt32(at + 5), secret: view.getInt32(at + 9) };
      }
      return this.#judging ? "hold" : "pass";
    }
    if (tag === TAG_ERROR && this.#mayRetryEncrypted) {
      this.#mayRetryEncrypted = false;
      void this.#retryEncrypted();
      return "stop";
    }
    if (tag === TAG_ERROR && this.#next < this.#candidates.length) {
      // A server starting up, shutting down or in recovery without hot standby: the next host.
      const code = errorCode(view, at);
      if (code === "57P03" || code === "57P01" || code === "57P02") {
        this.#tried.push(`${this.where}: not accepting connections (${code})`);
        this.#dropSocket();
        void this.#nextHost();
        return "stop";
      }
    }
    if (tag !== TAG_AUTH) return "pass";
    this.#mayRetryEncrypted = false;
    const kind = view.getInt32(at + 5);
    if (kind === AUTH_CLEARTEXT && !this.encrypted) {
      this.#fail(
        new Error(
          `PostgreSQL at ${this.where} asks for the password of user "${this.#db.user}" in ` +
            "cleartext on a connection that is not encrypted: refusing to send it; use TLS " +
            "(sslmode=require or stricter) or scram-sha-256 authentication",
        ),
      );
      return "stop";
    }
    if (kind === AUTH_SASL) this.#sasl = true;
    if (kind === AUTH_SASL_FINAL) this.#saslFinal = true;
    if (kind === AUTH_OK) {
      if (this.#sasl && !this.#saslFinal) {
        this.#fail(
          new Error(
            `PostgreSQL at ${this.where} accepted the login without SCRAM's final message, so ` +
              "it never proved it knows the password: refusing the connection (is something " +
              "in the middle?)",
          ),
        );
        return "stop";
      }
      this.#authenticated = true;
      // What follows (the server's parameters, up to ReadyForQuery) says whether this host fits.
      this.#judging = this.#attrs !== "any" || this.#candidates.length > 1;
      this.#reported.clear();
    }
    return "pass";
  }

  /**
   * Keeps `message` (a copy) until ReadyForQuery, then judges the host: one
   * that fits `target_session_attrs` gets its messages handed to pg; one that
   * does not is left for the next. False when this host was left.
   */
  #hold(message: Uint8Array, tag: number): boolean {
    this.#held.push(message);
    if (tag !== TAG_READY) return true;
    const standby = this.#reported.get("in_hot_standby") === "on";
    const readOnly = standby || this.#reported.get("default_transaction_read_only") === "on";
    const fits = {
      "any": true,
      "read-write": !readOnly,
      "read-only": readOnly,
      "primary": !standby,
      "standby": standby,
      "prefer-standby": standby,
    }[this.#attrs];
    const role = standby ? "a standby" : readOnly ? "read-only" : "a primary";
    if (!fits) {
      this.#tried.push(`${this.where}: ${role}`);
      this.#dropSocket();
      void this.#nextHost();
      return false;
    }
    this.#judging = false;
    if (this.#candidates.length > 1) chosen(this.where, role, this.#tried);
    for (const held of this.#held.splice(0)) this.#toPg(held);
    return true;
  }

  /** Lets go of the current socket quietly (pg is not told): another host follows. */
  #dropSocket(): void {
    const old = this.#socket;
    this.#socket = undefined;
    old?.removeAllListeners("close");
    old?.removeAllListeners("data");
    old?.destroy();
    this.#raw?.destroy();
  }

  /** `allow`: the server refused the plain connection; the same startup again over TLS. */
  async #retryEncrypted(): Promise<void> {
    this.#dropSocket();
    this.#partialLength = 0;
    try {
      const raw = await this.#dial();
      this.#raw = raw;
      if (await sslRequest(raw) !== "S") {
        raw.destroy();
        throw new Error(
          `Cannot connect to PostgreSQL at ${this.where}: it refused the unencrypted ` +
            "connection and does not accept TLS",
        );
      }
      const secure = await this.#startTls(raw, "require");
      this.#attach(secure);
      secure.write(this.#startup!);
    } catch (error) {
      this.#fail(error as Error);
    }
  }

  /** Hands whole messages to pg (as a Buffer over the same bytes). */
  #toPg(bytes: Uint8Array): void {
    if (bytes.length > 0) {
      this.emit("data", Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    }
  }

  /**
   * Takes the next copy's data from pg: once `trigger` (`W` for
   * START_REPLICATION, `H` for COPY TO STDOUT) arrives, every CopyData goes
   * to `onData` (await its promise to pause reading) until ReadyForQuery;
   * the other messages still go to pg, so the query's promise settles as it
   * would. Resolves when the copy has started.
   */
  takeCopy(
    trigger: 0x57 | 0x48,
    onData: CopyDataHandler,
    linger?: () => boolean,
  ): Promise<void> {
    if (this.#copy !== undefined) throw new Error("a copy is already running on this connection");
    return new Promise((started) => {
      this.#copy = { trigger, onData, started, active: false, linger };
    });
  }

  /** Whether a copy was taken and has not ended. */
  get copying(): boolean {
    return this.#copy !== undefined;
  }

  /** As net.Socket's; the first write (the startup message) is kept for `allow`'s retry. */
  write(data: Uint8Array, callback?: (error?: Error | null) => void): boolean {
    if (this.#startup === undefined) this.#startup = new Uint8Array(data);
    if (this.#socket === undefined) {
      callback?.(new Error("not connected"));
      return false;
    }
    return this.#socket.write(data, callback);
  }

  /** As net.Socket's. */
  end(callback?: () => void): this {
    this.writable = false;
    if (this.#socket === undefined) {
      this.destroy();
      callback?.();
    } else {
      this.#socket.end(callback);
    }
    return this;
  }

  /** As net.Socket's: closes the connection at once. */
  destroy(error?: Error): this {
    if (error !== undefined && !this.destroyed) this.emit("error", error);
    const socket = this.#socket;
    this.writable = false;
    if (socket === undefined || socket.destroyed) {
      if (!this.destroyed) {
        this.destroyed = true;
        queueMicrotask(() => this.emit("close"));
      }
      this.#raw?.destroy();
      return this;
    }
    socket.destroy();
    this.#raw?.destroy();
    return this;
  }

  /** As net.Socket's (pg sets it; every connection here has it already). */
  setNoDelay(): this {
    return this;
  }

  /** Keepalives on the TCP socket (none on Unix sockets). */
  setKeepAlive(enable: boolean, initialDelayMs = 0): this {
    this.#keepAlive = [enable, initialDelayMs];
    if (this.#path === undefined) this.#raw?.setKeepAlive(enable, initialDelayMs);
    return this;
  }

  /** As net.Socket's. */
  ref(): this {
    this.#socket?.ref();
    return this;
  }

  /** As net.Socket's. */
  unref(): this {
    this.#socket?.unref();
    return this;
  }

  /**
   * Asks PostgreSQL to cancel what this connection's backend is running (a
   * CancelRequest on a new connection, encrypted as this one was); resolves
   * once it was sent. Nothing happens before the backend's key is known.
   */
  async cancel(): Promise<void> {
    const key = this.backendKey;
    if (key === undefined) return;
    const request = new Uint8Array(16);
    const view = new DataView(request.buffer);
    view.setInt32(0, 16);
    view.setInt32(4, CANCEL_REQUEST);
    view.setInt32(8, key.pid);
    view.setInt32(12, key.secret);
    const raw = await this.#dial();
    // A request the server hangs up on (it is going away) is nothing to report, nor to wait for.
    const ignore = () => {};
    raw.on("error", ignore);
    try {
      let socket: net.Socket = raw;
      if (this.encrypted) {
        if (this.#db.sslnegotiation !== "direct" && await sslRequest(raw) !== "S") return;
        socket = await this.#startTls(raw, this.#db.sslmode ?? "prefer");
        socket.on("error", ignore);
      }
      await new Promise<void>((resolve) => {
        socket.once("close", () => resolve());
        socket.end(request, () => resolve());
      });
    } finally {
      raw.destroy();
    }
  }
}

/** The SQLSTATE of the ErrorResponse at `at` of `view`. */
function errorCode(view: DataView, at: number): string | undefined {
  const end = at + 1 + view.getInt32(at + 1);
  const bytes = new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  for (let pos = at + 5; pos < end && bytes[pos] !== 0;) {
    const type = bytes[pos];
    const stop = bytes.indexOf(0, pos + 1);
    if (type === 0x43) return new TextDecoder().decode(bytes.subarray(pos + 1, stop)); // C
    pos = stop + 1;
  }
  return undefined;
}

/** The host the server's connections went to last, so that a change of it is logged once. */
let lastChosen: string | undefined;

/** Logs a host chosen among several, when it is not the one chosen before. */
function chosen(where: string, role: string, passedOver: string[]): void {
  if (where === lastChosen) return;
  lastChosen = where;
  log.info(
    "database.host",
    `connections go to PostgreSQL at ${where} (${role})${
      passedOver.length > 0 ? `; passed over: ${passedOver.join("; ")}` : ""
    }`,
    { host: where },
  );
}

/** The size of the message whose header (at least 5 bytes) starts `bytes`: tag and length. */
function messageSize(bytes: Uint8Array): number {
  return new DataView(bytes.buffer, bytes.byteOffset, 5).getInt32(1) + 1;
}

/** Sends an SSLRequest on `socket` and reads the one-byte answer (`S` or `N`). */
function sslRequest(socket: net.Socket): Promise<string> {
  const request = new Uint8Array(8);
  new DataView(request.buffer).setInt32(0, 8);
  new DataView(request.buffer).setInt32(4, SSL_REQUEST);
  return new Promise((resolve, reject) => {
    const failed = (error: Error) => reject(error);
    socket.once("error", failed);
    socket.once("close", () => reject(new Error("PostgreSQL closed the connection")));
    socket.once("data", (answer: Uint8Array) => {
      // The server sends nothing more until it hears from us: no byte is lost between listeners.
      socket.off("error", failed);
      socket.removeAllListeners("close");
      if (answer.length !== 1) {
        reject(new Error("PostgreSQL answered the SSLRequest with more than one byte"));
      } else {
        resolve(String.fromCharCode(answer[0]));
      }
    });
    socket.write(request);
  });
}
