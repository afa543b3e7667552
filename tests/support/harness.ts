/**
 * Test support: a real PostgreSQL per test file, the server in-process or as
 * a child process, and a websocket client that waits on frames, not time.
 * @module
 */

import pg from "pg";
import { type AuthConfig, type Config, type DatabaseConfig, loadConfig } from "../../src/config.ts";
import { EmbeddedPostgres, type EmbeddedPostgresOptions } from "../../src/dev/embedded_postgres.ts";
import type { Change, StreamStateBody, TransactionFrame } from "../../src/protocol.ts";
import { type RunningServer, startServer } from "../../src/server.ts";
import { log, type LogLevel } from "../../src/observability/log.ts";
import { deadline, poll } from "./deadline.ts";

/** A PostgreSQL in a fresh temporary data directory, removed on dispose. */
export async function startPostgres(
  options: Partial<EmbeddedPostgresOptions> = {},
): Promise<EmbeddedPostgres & AsyncDisposable> {
  const dataDir = await Deno.makeTempDir({ prefix: "pgds-test-" });
  await Deno.chmod(dataDir, 0o755); // the postgres user must reach its data directory
  const server = await EmbeddedPostgres.start({
    dataDir: `${dataDir}/data`,
    ...options,
    settings: { fsync: "off", ...options.settings },
  });
  const stop = server.stop.bind(server);
  return Object.assign(server, {
    async [Symbol.asyncDispose]() {
      await stop();
      await Deno.remove(dataDir, { recursive: true });
    },
  });
}

/** The server's configuration for `db`, listening on a free loopback port. */
export function testConfig(db: DatabaseConfig, overrides: Partial<Config> = {}): Config {
  return { ...loadConfig(() => undefined), database: db, port: 0, ...overrides };
}

// In-process servers log warnings and errors only, unless TEST_LOG_LEVEL asks for more.
log.configure({ level: (Deno.env.get("TEST_LOG_LEVEL") as LogLevel | undefined) ?? "warn" });

/** The server, in this process, against `db`. */
export function startApi(
  db: DatabaseConfig,
  overrides: Partial<Config> = {},
): Promise<RunningServer> {
  return startServer(testConfig(db, overrides));
}

/** Authentication on with one admin token and HS256 JWTs signed with `jwtSecret`, audience "pgdeltastream". */
export function authOn(adminToken: string, jwtSecret = "s".repeat(40)): AuthConfig {
  return {
    mode: "on",
    adminTokens: [adminToken],
    jwtSecret,
    audience: "pgdeltastream",
    corsOrigins: [],
    jwksCooldownMs: 30_000,
  };
}

/** Runs one statement (or a script, without parameters) on a fresh connection. */
export async function sql<T extends pg.QueryResultRow = pg.QueryResultRow>(
  db: DatabaseConfig,
  text: string,
  values?: unknown[],
): Promise<T[]> {
  const client = new pg.Client(db);
  const what = `the statement ${JSON.stringify(text.trim().slice(0, 80))}`;
  await deadline(client.connect(), `a connection for ${what}`);
  try {
    const result: pg.QueryResult<T> = await deadline(
      client.query<T>(text, values),
      what,
      SQL_WAIT_MS,
    );
    return result.rows;
  } finally {
    await client.end();
  }
}

/** The longest a test's statement may take (bulk loads of a million rows included). */
const SQL_WAIT_MS = 180_000;

/**
 * Polls a query returning one row with a boolean `ok` until it is true:
 * for conditions PostgreSQL shows only in its views. Fails naming the query.
 */
export async function waitForSql(
  db: DatabaseConfig,
  query: string,
  values: unknown[] = [],
): Promise<void> {
  await poll(
    async () => (await sql<{ ok: boolean }>(db, query, values))[0]?.ok,
    `PostgreSQL to report: ${query.replace(/\s+/g, " ").trim()}`,
    { intervalMs: 100 },
  );
}

/** The headers of a valid websocket upgrade: a `fetch` with them reads the answer to a refused one. */
export const WEBSOCKET_HANDSHAKE: Readonly<Record<string, string>> = {
  upgrade: "websocket",
  connection: "upgrade",
  "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
  "sec-websocket-version": "13",
};

/** `POST` JSON and read the JSON answer as text plus status. */
export async function postJson(
  url: URL | string,
  body: unknown,
): Promise<{ status: number; text: string }> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: response.status, text: await response.text() };
}

/** `POST /v2/streams` with `body`; returns the created stream, or throws with the status and error. */
export async function createStream(
  base: URL,
  body: Record<string, unknown>,
): Promise<Record<string, unknown> & { slotName: string }> {
  const response = await postJson(new URL("/v2/streams", base), body);
  if (response.status !== 201) {
    throw new Error(`create failed: ${response.status} ${response.text}`);
  }
  return JSON.parse(response.text);
}

/** The state of stream `name` (`GET /v2/streams/{name}`), which must exist. */
export async function streamState(base: URL, name: string): Promise<StreamStateBody> {
  const response = await fetch(new URL(`/v2/streams/${name}`, base));
  if (response.status !== 200) {
    throw new Error(`GET /v2/streams/${name}: ${response.status} ${await response.text()}`);
  }
  return await response.json();
}

/** Collects the in-process servers' log lines as JSON until disposed (then: text, warnings up). */
export function captureLog(): {
  events: () => Record<string, unknown>[];
  [Symbol.dispose](): void;
} {
  const lines: string[] = [];
  log.configure({
    format: "json",
    level: "info",
    sink: (_level: LogLevel, line: string) => lines.push(line),
  });
  return {
    events: () => lines.map((l) => JSON.parse(l)),
    [Symbol.dispose]: () =>
      log.configure({
        format: "text",
        level: "warn",
        sink: (level, line) =>
          (level === "warn" || level === "error" ? console.error : console.log)(line),
      }),
  };
}

/** `DELETE` at `path` of `base`; returns the status (the body is read). */
export async function deleteAt(base: URL, path: string): Promise<number> {
  const response = await fetch(new URL(path, base), { method: "DELETE" });
  await response.body?.cancel();
  return response.status;
}

/** `GET /v1/init`; returns the slot name. */
export async function init(base: URL): Promise<string> {
  const response = await fetch(new URL("/v1/init", base));
  const body = await response.json();
  if (response.status !== 200) {
    throw new Error(`init failed: ${response.status} ${JSON.stringify(body)}`);
  }
  return body.slotName;
}

/** A websocket client with a queue of received text frames. */
export class StreamClient implements AsyncDisposable {
  readonly socket: WebSocket;
  readonly url: string;
  readonly #frames: string[] = [];
  #waiter: (() => void) | undefined;
  /** Settles with the close event. */
  readonly closed: Promise<CloseEvent>;
  /** Resolves when open; rejects if the server refused the upgrade. */
  readonly opened: Promise<void>;

  constructor(url: string) {
    this.url = url;
    this.socket = new WebSocket(url);
    this.socket.addEventListener("message", (event) => {
      this.#frames.push(event.data as string);
      this.#wake();
    });
    this.closed = new Promise((resolve) =>
      this.socket.addEventListener("close", (event) => {
        this.#wake();
        resolve(event);
      })
    );
    this.opened = new Promise((resolve, reject) => {
      this.socket.addEventListener("open", () => resolve());
      this.socket.addEventListener("error", () => reject(new Error("websocket failed to open")));
    });
    this.opened.catch(() => {});
  }

  /** Connects to `/v1/lr/stream?slotName=…` of `base`. */
  static open(base: URL, slotName: string): Promise<StreamClient> {
    return StreamClient.connect(base, `/v1/lr/stream?slotName=${encodeURIComponent(slotName)}`);
  }

  /** Connects to the websocket at `path` of `base` (a v2 stream's `changes` or `tail`, say). */
  static async connect(base: URL, path: string): Promise<StreamClient> {
    const url = new URL(path, base);
    url.protocol = "ws:";
    const client = new StreamClient(url.href);
    await deadline(client.opened, `the websocket ${url.pathname}${url.search} to open`);
    return client;
  }

  /** Connects to `/v2/streams/{name}/changes` of `base`. */
  static changes(base: URL, stream: string): Promise<StreamClient> {
    return StreamClient.connect(base, `/v2/streams/${stream}/changes`);
  }

  /** Whether a frame has arrived and not been read yet. */
  get pending(): number {
    return this.#frames.length;
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }

  /** The next frame as text; rejects if the socket closes first, or after `ms` without one. */
  async nextText(ms?: number): Promise<string> {
    while (this.#frames.length === 0) {
      if (this.socket.readyState === WebSocket.CLOSED) {
        throw new Error("socket closed while waiting for a frame");
      }
      await deadline(
        new Promise<void>((resolve) => (this.#waiter = resolve)),
        `a frame on ${new URL(this.url).pathname}`,
        ms,
      );
    }
    return this.#frames.shift()!;
  }

  /** The close event, waiting at most `ms`. */
  closedWithin(ms?: number): Promise<CloseEvent> {
    return deadline(this.closed, `the websocket ${new URL(this.url).pathname} to close`, ms);
  }

  /** The next frame, parsed. */
  async next(ms?: number): Promise<TransactionFrame> {
    return JSON.parse(await this.nextText(ms));
  }

  /** The next frame of a v2 stream, parsed (its changes include truncate and schema changes). */
  async nextV2(ms?: number): Promise<TransactionFrame<Change>> {
    return JSON.parse(await this.nextText(ms));
  }

  /** Sends `{"lsn": lsn}`. */
  ack(lsn: string): void {
    this.socket.send(JSON.stringify({ lsn }));
  }

  /** Closes and waits for the close handshake. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.socket.readyState !== WebSocket.CLOSED) this.socket.close();
    await this.closedWithin();
  }
}

/** The words of a deno.json task's command line, environment assignments first. */
async function taskCommand(task: "start" | "compile" | "dev"): Promise<string[]> {
  const config = JSON.parse(await Deno.readTextFile(new URL("../../deno.json", import.meta.url)));
  const definition = config.tasks[task];
  const command: string = typeof definition === "string" ? definition : definition.command;
  return command.split(/\s+/);
}

/** The words of a deno.json task, after `deno` (e.g. `run`, flags, `src/main.ts`). */
export async function taskWords(task: "start" | "compile" | "dev"): Promise<string[]> {
  const words = await taskCommand(task);
  return words.slice(words.indexOf("deno") + 1);
}

/** The environment a deno.json task sets before `deno` (`NAME=value` words). */
export async function taskEnv(task: "start" | "compile" | "dev"): Promise<Record<string, string>> {
  const words = await taskCommand(task);
  return Object.fromEntries(
    words.slice(0, words.indexOf("deno")).map((
      w,
    ) => [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)]),
  );
}

/** The permission and V8 flags of a deno.json task: what the server runs with. */
export async function runtimeFlags(task: "start" | "compile" | "dev"): Promise<string[]> {
  return (await taskWords(task)).filter((word) => /^--(allow-|v8-flags=)/.test(word));
}

/** A task's runtime flags and its `--quiet` and `--env-file`: what `deno task <task>` prints too. */
export async function taskFlags(task: "start" | "dev"): Promise<string[]> {
  return (await taskWords(task)).filter((word) =>
    /^--(allow-|v8-flags=|quiet$|env-file$)/.test(word)
  );
}

/** Options of {@link ChildProcess.spawn}. */
export interface SpawnOptions {
  /** The program; default this Deno. */
  command?: string;
  args: string[];
  /** The whole environment (nothing is inherited). */
  env: Record<string, string>;
  cwd?: string;
  /** What the process prints once it is ready; its first group is the result. */
  ready: RegExp;
  /** What it is, for messages. */
  name: string;
}

/** A child process whose output is collected, started and waited for until it prints that it is ready. */
export class ChildProcess implements AsyncDisposable {
  /** The `ready` pattern's first group, as printed. */
  readonly ready: string;
  /** Everything it printed (stdout and stderr), once it has exited. */
  readonly output: Promise<string>;
  readonly #child: Deno.ChildProcess;
  readonly #name: string;
  readonly #log: { text: string };

  private constructor(
    child: Deno.ChildProcess,
    name: string,
    ready: string,
    output: Promise<string>,
    log: { text: string },
  ) {
    this.#child = child;
    this.#name = name;
    this.ready = ready;
    this.output = output;
    this.#log = log;
  }

  /** What it has printed so far (stdout and stderr), while it runs. */
  get printed(): string {
    return this.#log.text;
  }

  /** Spawns it; resolves once it printed `ready`, rejects with its output if it exits first. */
  static async spawn(options: SpawnOptions): Promise<ChildProcess> {
    const child = new Deno.Command(options.command ?? Deno.execPath(), {
      args: options.args,
      env: options.env,
      cwd: options.cwd,
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const ready = Promise.withResolvers<string>();
    const log = { text: "" };
    const collect = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        log.text += chunk;
        const match = options.ready.exec(log.text);
        if (match) ready.resolve(match[1]);
      }
    };
    const output = Promise.all([collect(child.stdout), collect(child.stderr)]).then(() => log.text);
    void child.status.then(async (status) => {
      await output; // all it printed, before saying why it failed
      ready.reject(
        new Error(
          `${options.name} exited with code ${status.code} before it was ready:\n${log.text}`,
        ),
      );
    });
    const printed = await deadline(ready.promise, `${options.name} to be ready`).catch(
      async (error) => {
        try {
          child.kill("SIGKILL");
        } catch { /* exited */ }
        await child.status;
        await output;
        throw error;
      },
    );
    return new ChildProcess(child, options.name, printed, output, log);
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Sends `signal` and waits for the exit status. */
  async kill(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    try {
      this.#child.kill(signal);
    } catch { /* already exited */ }
    const status = await deadline(this.#child.status, `${this.#name} (${this.pid}) to exit`);
    await this.output;
    return status;
  }

  /** Waits for the process to exit by itself (at most the default deadline), with its output. */
  async wait(): Promise<Deno.CommandStatus> {
    const status = await deadline(this.#child.status, `${this.#name} (${this.pid}) to exit`);
    await this.output;
    return status;
  }

  /** Kills the process if it still runs. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill("SIGKILL");
  }
}

/** The server as a separate process, started as `deno task start` starts it: by its launcher. */
export class ServerProcess implements AsyncDisposable {
  readonly url: URL;
  /** The launcher's process (it runs the server with the permissions its settings need). */
  readonly #process: ChildProcess;
  /** The server's own process id: the launcher's child. */
  readonly #serverPid: number;

  private constructor(process: ChildProcess, serverPid: number) {
    this.#process = process;
    this.#serverPid = serverPid;
    this.url = new URL(process.ready);
  }

  /**
   * Spawns the launcher (`src/launch.ts`, with `deno task start`'s flags)
   * against `db` with `env` added, `extraFlags` for the server; resolves
   * once the server prints its address.
   */
  static async spawn(
    db: DatabaseConfig,
    env: Record<string, string> = {},
    extraFlags: string[] = [],
  ): Promise<ServerProcess> {
    const launcher = await ChildProcess.spawn({
      name: "the server process",
      args: [
        "run",
        ...await runtimeFlags("start"),
        new URL("../../src/launch.ts", import.meta.url).pathname,
        ...extraFlags,
      ],
      env: {
        ...await taskEnv("start"),
        PGHOST: db.host,
        PGPORT: String(db.port),
        PGUSER: db.user,
        DBNAME: db.database,
        SERVERHOST: "127.0.0.1",
        SERVERPORT: "0",
        // The launcher runs "deno" (its only --allow-run), found on the PATH as deno task finds it.
        PATH: Deno.execPath().slice(0, Deno.execPath().lastIndexOf("/")),
        ...env,
      },
      ready: /listening on (http:\/\/\S+)/,
    });
    const children = await Deno.readTextFile(
      `/proc/${launcher.pid}/task/${launcher.pid}/children`,
    );
    return new ServerProcess(launcher, Number(children.trim().split(/\s+/)[0]));
  }

  /** Everything it printed, once it has exited. */
  get output(): Promise<string> {
    return this.#process.output;
  }

  /** What it has printed so far, while it runs (for a failed test's message). */
  get printed(): string {
    return this.#process.printed;
  }

  /** The server's process id (for /proc readings in the benchmark). */
  get pid(): number {
    return this.#serverPid;
  }

  /**
   * Sends `signal` to the server (the launcher passes SIGINT and SIGTERM on;
   * SIGKILL goes to the server itself) and waits until both have exited;
   * the status is the server's, as the launcher reports it.
   */
  async kill(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    try {
      Deno.kill(this.#serverPid, signal);
    } catch { /* exited already */ }
    const status = await this.#process.wait();
    return status.code === 128 + 9
      ? { success: false, code: status.code, signal: "SIGKILL" }
      : status;
  }

  /** Kills the process if it still runs. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill("SIGKILL");
  }
}
