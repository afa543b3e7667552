/**
 * `deno task bench`: throughput, latency, snapshot speed and memory of the
 * server (a separate process, started as `deno task start` runs it) against
 * an embedded PostgreSQL, each next to its baseline, measured in one run.
 *
 * P1 backlog drain vs pg_recvlogical; P2 commit→receipt latency; P3 snapshot
 * export vs COPY; P4 and M1/M2 peak server RSS (slow reader, 1M-row transaction).
 * @module
 */

import pg from "pg";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { Authenticator } from "../src/auth/authenticator.ts";
import { EmbeddedPostgres } from "../src/dev/embedded_postgres.ts";
import { createStream, deleteAt, init, postJson, ServerProcess } from "../tests/support/harness.ts";
import { connectStream, type RowChange } from "../client/mod.ts";
import { NatsServer } from "../tests/support/nats.ts";
import { startStandbyPair } from "../tests/support/standby.ts";

const args = new Set(Deno.args);
const QUICK = args.has("--quick");
/** `--only=P1,M2` runs just those phases (P1 P1M P1S P2 P2CPU P3 P5 P6 M1 M2 F1); default all. */
const ONLY = Deno.args.find((a) => a.startsWith("--only="))?.slice(7).split(",");
const want = (phase: string) => ONLY === undefined || ONLY.includes(phase);
/** `--profile=DIR`: run the server under V8's CPU profiler and print where its time went. */
const PROFILE_DIR = Deno.args.find((a) => a.startsWith("--profile="))?.slice(10);
const serverFlags = PROFILE_DIR ? ["--cpu-prof", `--cpu-prof-dir=${PROFILE_DIR}`] : [];
/** `--env=NAME=value` (repeatable): the server runs with these variables (e.g. METRICS=off). */
const SERVER_ENV = Object.fromEntries(
  Deno.args.filter((a) => a.startsWith("--env=")).map((a) => {
    const [name, ...value] = a.slice(6).split("=");
    return [name, value.join("=")];
  }),
);
/** `--async-commit`: P2CPU's writer commits with synchronous_commit=off. */
const ASYNC_COMMIT = args.has("--async-commit");
/** `--rates=1000,3000`: P2CPU's rates (default 250, 1000, 3000). */
const P2CPU_RATES = Deno.args.find((a) => a.startsWith("--rates="))?.slice(8).split(",").map(
  Number,
) ?? [250, 1000, 3000];

/** Prints the functions with the most self time in the newest profile of `dir`. */
async function printProfile(dir: string): Promise<void> {
  const files = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name.endsWith(".cpuprofile")) files.push(`${dir}/${entry.name}`);
  }
  const stats = await Promise.all(
    files.map(async (f) => ({ f, t: (await Deno.stat(f)).mtime!.getTime() })),
  );
  const newest = stats.sort((a, b) => b.t - a.t)[0]?.f;
  if (!newest) return;
  const profile = JSON.parse(await Deno.readTextFile(newest));
  const self = new Map<number, number>();
  for (const id of profile.samples) self.set(id, (self.get(id) ?? 0) + 1);
  const byFunction = new Map<string, number>();
  for (const node of profile.nodes) {
    const frame = node.callFrame;
    const where = `${frame.functionName || "(anonymous)"} ${
      frame.url.split("/").slice(-2).join("/")
    }:${frame.lineNumber + 1}`;
    byFunction.set(where, (byFunction.get(where) ?? 0) + (self.get(node.id) ?? 0));
  }
  const total = profile.samples.length;
  console.log(`\nserver CPU profile (${newest}): top self time`);
  for (const [where, n] of [...byFunction].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
    console.log(`${((100 * n) / total).toFixed(1).padStart(5)}%  ${where}`);
  }
}
const P1_ROWS = QUICK ? 50_000 : 200_000;
const P2_SECONDS = QUICK ? 5 : 30;
const P3_ROWS = QUICK ? 200_000 : 1_000_000;
const M1_ROWS = QUICK ? 60_000 : 300_000;
const M2_ROWS = QUICK ? 200_000 : 1_000_000;

const results: [string, string, string, string][] = [];
function report(metric: string, ours: string, baseline = "", note = ""): void {
  results.push([metric, ours, baseline, note]);
  console.error(
    `  ${metric}: ${ours}${baseline ? `  (baseline ${baseline})` : ""}${note ? `  ${note}` : ""}`,
  );
}

/** Peak resident set of `pid` since the last reset, in MiB (VmHWM). */
async function peakRssMiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

/** Current resident set of `pid`, in MiB (VmRSS). */
async function rssMiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

/** Resets the peak-RSS counter of `pid` (root or same user). */
async function resetPeak(pid: number): Promise<void> {
  await Deno.writeTextFile(`/proc/${pid}/clear_refs`, "5");
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** CPU seconds (user + system) process `pid` has used, from /proc. */
async function cpuSeconds(pid: number): Promise<number> {
  const fields = (await Deno.readTextFile(`/proc/${pid}/stat`)).split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

/** A consumer (the client library) that acks each transaction once it has counted its rows. */
function drain(
  base: URL,
  slotName: string,
  rows: number,
  onChange?: (change: { columnvalues?: unknown[] }) => void,
): Promise<number> {
  return drainStream(base, { slot: slotName }, rows, onChange);
}

/** {@link drain} of a v1 slot or a v2 stream, counting row changes only. */
async function drainStream(
  base: URL,
  target: { slot: string } | { stream: string },
  rows: number,
  onChange?: (change: { columnvalues?: unknown[] }) => void,
): Promise<number> {
  const started = performance.now();
  // One reconnect would hide a failure here: a bench run stops at the first close instead.
  const stream = connectStream({ url: base, ...target, reconnect: { maxAttempts: 0 } });
  let seen = 0;
  for await (const tx of stream) {
    for (const change of tx.changes) {
      if (change.kind !== "schema") seen++;
      onChange?.(change as RowChange);
    }
    if (seen >= rows) {
      stream.acknowledge(tx); // leaving with break: say it was handled, so close() acks it
      break;
    }
  }
  const elapsed = performance.now() - started;
  // Close (sending the last ack) and wait for the close handshake: the server refuses a second
  // stream on a slot still open.
  await stream.close();
  return elapsed;
}

/**
 * A deliberately slow reader on a raw TCP socket: it reads `bytesPerTick`
 * every `tickMs`, so the server's socket buffer fills and backpressure must
 * hold its memory. Counts rows by parsing the unmasked server frames.
 */
async function slowDrain(
  base: URL,
  slotName: string,
  rows: number,
  bytesPerTick: number,
  tickMs: number,
) {
  const conn = await Deno.connect({ hostname: base.hostname, port: Number(base.port) });
  const key = btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(16))));
  await conn.write(new TextEncoder().encode(
    `GET /v1/lr/stream?slotName=${slotName} HTTP/1.1\r\nHost: ${base.host}\r\nUpgrade: websocket\r\n` +
      `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  ));
  let buffer = new Uint8Array(0);
  const append = (chunk: Uint8Array) => {
    const next = new Uint8Array(buffer.length + chunk.length);
    next.set(buffer);
    next.set(chunk, buffer.length);
    buffer = next;
  };
  const chunk = new Uint8Array(bytesPerTick);
  let headerDone = false;
  let seen = 0;
  let message = "";
  const decoder = new TextDecoder();
  while (seen < rows) {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("slow reader: connection closed");
    append(chunk.subarray(0, n));
    if (!headerDone) {
      let end = -1;
      for (let i = 3; i < buffer.length && end < 0; i++) {
        if (
          buffer[i - 3] === 13 && buffer[i - 2] === 10 && buffer[i - 1] === 13 && buffer[i] === 10
        ) end = i;
      }
      if (end < 0) continue;
      buffer = buffer.slice(end + 1);
      headerDone = true;
    }
    for (;;) {
      if (buffer.length < 2) break;
      let length = buffer[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (buffer.length < 4) break;
        length = (buffer[2] << 8) | buffer[3];
        offset = 4;
      } else if (length === 127) {
        if (buffer.length < 10) break;
        length = Number(new DataView(buffer.buffer, buffer.byteOffset + 2, 8).getBigUint64(0));
        offset = 10;
      }
      if (buffer.length < offset + length) break;
      const fin = (buffer[0] & 0x80) !== 0;
      const opcode = buffer[0] & 0x0f;
      if (opcode >= 8) {
        // Control frames: a close ends the run; pings need no answer for the server's sake here.
        const payload = buffer.subarray(offset, offset + length);
        buffer = buffer.slice(offset + length);
        if (opcode === 8) {
          throw new Error(
            `slow reader: server closed ${(payload[0] << 8) | payload[1]} ${
              decoder.decode(payload.subarray(2))
            }`,
          );
        }
        continue;
      }
      message += decoder.decode(buffer.subarray(offset, offset + length), { stream: !fin });
      buffer = buffer.slice(offset + length);
      if (!fin) continue; // a fragmented message: its continuation frames follow
      seen += JSON.parse(message).change.length;
      message = "";
    }
    await sleep(tickMs);
  }
  conn.close();
}

async function timed(
  command: string,
  commandArgs: string[],
  env: Record<string, string> = {},
): Promise<number> {
  const started = performance.now();
  const { success, stderr } = await new Deno.Command(command, {
    args: commandArgs,
    env,
    stdout: "null",
    stderr: "piped",
  })
    .output();
  if (!success) throw new Error(`${command} failed: ${new TextDecoder().decode(stderr)}`);
  return performance.now() - started;
}

/** Runs `command` under `sh`, whose `times` reports the CPU its child used; wall ms and CPU s. */
async function timedWithCpu(
  command: string,
  commandArgs: string[],
): Promise<{ ms: number; cpu: number }> {
  const started = performance.now();
  const { success, stdout, stderr } = await new Deno.Command("sh", {
    args: ["-c", '"$@" >/dev/null && times', "sh", command, ...commandArgs],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const ms = performance.now() - started;
  if (!success) throw new Error(`${command} failed: ${new TextDecoder().decode(stderr)}`);
  // `times` prints the shell's user and system time, then its children's: "0m0.750s 0m0.050s".
  const children = new TextDecoder().decode(stdout).trim().split("\n").at(-1)!;
  const cpu = [...children.matchAll(/(\d+)m([\d.]+)s/g)]
    .reduce((sum, m) => sum + Number(m[1]) * 60 + Number(m[2]), 0);
  return { ms, cpu };
}

/** libpq client programs' arguments to reach the bench's database as `postgres`. */
function connectionArgs(db: { host: string; port: number }): string[] {
  return ["-h", db.host, "-p", String(db.port), "-U", "postgres", "-d", "postgres"];
}

/**
 * `pg_recvlogical`'s arguments to drain `slot` (pgoutput, `publication`) up to `endLsn`, or to
 * follow it live (reporting its position every second) without one.
 */
function recvlogicalArgs(
  db: { host: string; port: number },
  slot: string,
  endLsn: string | undefined,
  publication: string,
) {
  return [
    ...connectionArgs(db),
    "-S",
    slot,
    "--start",
    ...(endLsn === undefined ? ["-s", "1"] : [`--endpos=${endLsn}`]),
    "--no-loop",
    "-f",
    "/dev/null",
    "-o",
    "proto_version=1",
    "-o",
    `publication_names=${publication}`,
  ];
}

async function main(): Promise<void> {
  const dataDir = await Deno.makeTempDir({ prefix: "pgds-bench-" });
  await Deno.chmod(dataDir, 0o755);
  await using postgres = await EmbeddedPostgres.start({
    dataDir: `${dataDir}/data`,
    // Durable commits (the default): walsenders send only flushed WAL, so synchronous_commit=off
    // would add up to wal_writer_delay (200 ms) to every latency.
    settings: { shared_buffers: "512MB", max_wal_size: "4GB" },
  });
  const db = postgres.database;
  const sql = new pg.Client(db);
  sql.on("error", () => {}); // a failure surfaces through the query that meets it
  await sql.connect();
  const psqlArgs = ["-X", "-q", ...connectionArgs(db)];
  let server = await ServerProcess.spawn(db, SERVER_ENV, serverFlags);
  const machine = `${navigator.hardwareConcurrency} cores, ${
    Math.round(
      Number(/MemTotal:\s+(\d+)/.exec(await Deno.readTextFile("/proc/meminfo"))![1]) / 1048576,
    )
  } GiB`;
  console.error(
    `pgdeltastream bench on ${machine}, PostgreSQL ${
      (await sql.query("SHOW server_version")).rows[0].server_version
    }`,
  );
  try {
    if (want("P1")) {
      // P1: backlog drain, next to pg_recvlogical (pgoutput to /dev/null) on the same backlog.
      console.error("P1 backlog drain ...");
      await sql.query(
        "CREATE TABLE bench_t(id bigserial primary key, a int, b text, c timestamptz default now())",
      );
      await sql.query("CREATE PUBLICATION bench_pub FOR TABLE bench_t");
      await sql.query("SELECT pg_create_logical_replication_slot('lim_pgo', 'pgoutput')");
      await resetPeak(server.pid);
      const p1Slot = await init(server.url);
      const transactions = P1_ROWS / 100;
      await sql.query(`DO $$ BEGIN FOR i IN 1..${transactions} LOOP
      INSERT INTO bench_t(a, b) SELECT g, md5(g::text) FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`);
      const endLsn = (await sql.query("SELECT pg_current_wal_lsn()::text AS lsn")).rows[0].lsn;
      const recv = await timedWithCpu(
        "pg_recvlogical",
        recvlogicalArgs(db, "lim_pgo", endLsn, "bench_pub"),
      );
      const serverCpu = await cpuSeconds(server.pid);
      const oursMs = await drain(server.url, p1Slot, P1_ROWS);
      const oursCpu = await cpuSeconds(server.pid) - serverCpu;
      const ours = P1_ROWS / (oursMs / 1000);
      const limit = P1_ROWS / (recv.ms / 1000);
      report(
        `P1 drain ${P1_ROWS} rows / ${transactions} tx`,
        `${Math.round(ours)} rows/s`,
        `${Math.round(limit)} rows/s pg_recvlogical`,
        `ratio ${(ours / limit).toFixed(2)}x (target >= 0.95x)`,
      );
      const per = (cpu: number) => cpu / (P1_ROWS / 100_000);
      report(
        "P1 CPU per 100k changes (user + sys)",
        `server ${per(oursCpu).toFixed(3)} s`,
        `pg_recvlogical ${per(recv.cpu).toFixed(3)} s`,
        `ratio ${(oursCpu / recv.cpu).toFixed(2)}x (target <= 1.0x)`,
      );
      report("P4 peak server RSS during P1", `${(await peakRssMiB(server.pid)).toFixed(0)} MiB`);
      await sql.query("SELECT pg_drop_replication_slot('lim_pgo')");
    }
    if (want("P1M")) {
      // P1 with metrics on and off (METRICS=off), interleaved, several runs each: the metrics'
      // cost on the hot path, by CPU per change (the steadier figure here) and by rate.
      console.error("P1M metrics on vs off ...");
      await sql.query(
        "CREATE TABLE IF NOT EXISTS bench_m(id bigserial primary key, a int, b text)",
      );
      await using off = await ServerProcess.spawn(db, { METRICS: "off" }, serverFlags);
      const runs: Record<"on" | "off", { cpu: number; rate: number }[]> = { on: [], off: [] };
      for (let run = 0; run < (QUICK ? 2 : 4); run++) {
        for (const [mode, target] of [["on", server], ["off", off]] as const) {
          const slot = await init(target.url);
          await sql.query(`DO $$ BEGIN FOR i IN 1..${P1_ROWS / 100} LOOP
          INSERT INTO bench_m(a, b) SELECT g, md5(g::text) FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`);
          const before = await cpuSeconds(target.pid);
          const ms = await drain(target.url, slot, P1_ROWS);
          runs[mode].push({
            cpu: (await cpuSeconds(target.pid) - before) / (P1_ROWS / 100_000),
            rate: P1_ROWS / (ms / 1000),
          });
        }
      }
      const median = (values: number[]) => values.sort((a, b) => a - b)[values.length >> 1];
      const cpu = (mode: "on" | "off") => median(runs[mode].map((r) => r.cpu));
      const rate = (mode: "on" | "off") => median(runs[mode].map((r) => r.rate));
      report(
        "P1M CPU per 100k changes, metrics on vs off (median)",
        `on ${cpu("on").toFixed(3)} s`,
        `off ${cpu("off").toFixed(3)} s`,
        `${
          ((cpu("on") / cpu("off") - 1) * 100).toFixed(1).replace(/^(?!-)/, "+")
        }% (target <= 5%); ` +
          `runs on ${runs.on.map((r) => r.cpu.toFixed(3)).join(" ")}, off ${
            runs.off.map((r) => r.cpu.toFixed(3)).join(" ")
          }`,
      );
      report(
        "P1M drain rate, metrics on vs off (median)",
        `on ${Math.round(rate("on"))} rows/s`,
        `off ${Math.round(rate("off"))} rows/s`,
        `ratio ${(rate("on") / rate("off")).toFixed(2)}x`,
      );
      const scrape = await fetch(new URL("/metrics", server.url));
      const text = await scrape.text();
      report(
        "P1M /metrics after the runs",
        `${
          /pgdeltastream_changes_sent_total\{stream="v1"\} (\d+)/.exec(text)?.[1]
        } changes sent (v1)`,
      );
    }
    if (want("P1S")) {
      // P1 with v2 streams: 1, 4 and 8 streams on the same write load, and one whose filter passes
      // 10% of the rows; the server's CPU per change beside the rate.
      console.error("P1S v2 streams ...");
      await sql.query(
        "CREATE TABLE IF NOT EXISTS bench_t(id bigserial primary key, a int, b text, c timestamptz default now())",
      );
      const transactions = P1_ROWS / 100;
      const backlog = async () => {
        await sql.query(`DO $$ BEGIN FOR i IN 1..${transactions} LOOP
        INSERT INTO bench_t(a, b) SELECT g, md5(g::text) FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`);
      };
      const create = async (name: string, where?: unknown[]) => {
        await createStream(server.url, {
          name,
          tables: [where ? { table: "bench_t", where } : "bench_t"],
        });
      };
      const remove = (name: string) => deleteAt(server.url, `/v2/streams/${name}`);
      let perChangeOne = 0;
      for (const count of [1, 4, 8]) {
        const names = Array.from({ length: count }, (_, i) => `p1s-${count}-${i}`);
        for (const name of names) await create(name);
        await backlog();
        const cpu = await cpuSeconds(server.pid);
        const started = performance.now();
        await Promise.all(
          names.map((name) => drainStream(server.url, { stream: name }, P1_ROWS)),
        );
        const seconds = (performance.now() - started) / 1000;
        const used = await cpuSeconds(server.pid) - cpu;
        const perChange = used / (count * P1_ROWS / 100_000);
        if (count === 1) perChangeOne = perChange;
        report(
          `P1S ${count} v2 stream${count > 1 ? "s" : ""}, ${P1_ROWS} rows each`,
          `${Math.round(P1_ROWS / seconds)} rows/s per stream`,
          "",
          `server CPU ${perChange.toFixed(3)} s per 100k delivered changes (${
            Math.round(count * P1_ROWS / seconds)
          } changes/s in all)`,
        );
        for (const name of names) await remove(name);
      }
      // A filter that passes 10% of the rows (a is 1..100 in every transaction).
      await create("p1s-filtered", [["a", "<=", 10]]);
      await backlog();
      const cpu = await cpuSeconds(server.pid);
      const started = performance.now();
      await drainStream(server.url, { stream: "p1s-filtered" }, P1_ROWS / 10);
      const seconds = (performance.now() - started) / 1000;
      const perExamined = (await cpuSeconds(server.pid) - cpu) / (P1_ROWS / 100_000);
      report(
        `P1S filter passing 10% of ${P1_ROWS} rows`,
        `${Math.round(P1_ROWS / seconds)} rows/s examined`,
        "",
        `server CPU ${perExamined.toFixed(3)} s per 100k examined (${
          (perExamined / perChangeOne).toFixed(2)
        }x unfiltered)`,
      );
      await remove("p1s-filtered");
    }
    if (want("A1")) {
      // A1: what checking a credential costs: requests/s of one cheap authenticated request with an
      // HS256 JWT, an ES256 JWT (JWKS, cached) and an admin token, against AUTH=none; and the
      // verifications per second of the checker alone.
      console.error("A1 authentication cost ...");
      const secret = "bench-secret-".padEnd(40, "x");
      const adminToken = "bench-admin-token-0123456789";
      const key = await generateKeyPair("ES256", { extractable: true });
      const jwk = { ...(await exportJWK(key.publicKey)), kid: "bench", alg: "ES256" };
      const jwksServer = Deno.serve(
        { hostname: "127.0.0.1", port: 0, onListen: () => {} },
        () => Response.json({ keys: [jwk] }),
      );
      const exp = Math.floor(Date.now() / 1000) + 3600;
      const hsToken = await new SignJWT({ aud: "pgdeltastream", exp, streams: ["*"] })
        .setProtectedHeader({ alg: "HS256" }).sign(new TextEncoder().encode(secret));
      const esToken = await new SignJWT({ aud: "pgdeltastream", exp, streams: ["*"] })
        .setProtectedHeader({ alg: "ES256", kid: "bench" }).sign(key.privateKey);
      const requests = QUICK ? 500 : 3000;
      const rate = async (base: URL, token?: string) => {
        const headers: Record<string, string> = token ? { authorization: `Bearer ${token}` } : {};
        const run = async () => {
          for (let i = 0; i < requests / 4; i++) {
            const response = await fetch(new URL("/v2/streams/nope", base), { headers });
            if (response.status !== 404) throw new Error(`status ${response.status}`);
            await response.body?.cancel();
          }
        };
        const started = performance.now();
        await Promise.all([run(), run(), run(), run()]);
        return requests / ((performance.now() - started) / 1000);
      };
      await using secured = await ServerProcess.spawn(db, {
        JWT_SECRET: secret,
        ADMIN_TOKENS: adminToken,
        JWKS_URL: `http://127.0.0.1:${jwksServer.addr.port}/`,
      });
      await using open = await ServerProcess.spawn(db, { AUTH: "none" });
      await rate(open.url); // warm up both
      await rate(secured.url, esToken);
      const none = await rate(open.url);
      const hs = await rate(secured.url, hsToken);
      const es = await rate(secured.url, esToken);
      const adm = await rate(secured.url, adminToken);
      report(
        "A1 requests/s of GET /v2/streams/<name> (404), 4 clients",
        `HS256 JWT ${Math.round(hs)}, ES256 JWT (JWKS) ${Math.round(es)}, admin token ${
          Math.round(adm)
        }`,
        `AUTH=none ${Math.round(none)}`,
        `(${((1 - hs / none) * 100).toFixed(0)}% / ${((1 - es / none) * 100).toFixed(0)}% / ${
          ((1 - adm / none) * 100).toFixed(0)
        }% fewer)`,
      );
      const authenticator = new Authenticator({
        mode: "on",
        adminTokens: [adminToken],
        jwtSecret: secret,
        jwksUrl: `http://127.0.0.1:${jwksServer.addr.port}/`,
        audience: "pgdeltastream",
        corsOrigins: [],
        jwksCooldownMs: 30_000,
      });
      const perSecond = async (token: string) => {
        await authenticator.authenticate(token);
        const started = performance.now();
        for (let i = 0; i < requests; i++) await authenticator.authenticate(token);
        return requests / ((performance.now() - started) / 1000);
      };
      report(
        "A1 verifications/s of a token seen before (cached), one core",
        `HS256 ${Math.round(await perSecond(hsToken))}, ES256 ${
          Math.round(await perSecond(esToken))
        }, admin token ${Math.round(await perSecond(adminToken))}`,
      );
      // First sight of a token: every one different, so each is verified for real.
      const fresh = async (alg: "HS256" | "ES256") => {
        const tokens = await Promise.all(
          Array.from(
            { length: requests / 3 },
            (_, i) =>
              new SignJWT({ aud: "pgdeltastream", exp, streams: ["*"], n: i })
                .setProtectedHeader(alg === "HS256" ? { alg } : { alg, kid: "bench" })
                .sign(alg === "HS256" ? new TextEncoder().encode(secret) : key.privateKey),
          ),
        );
        const started = performance.now();
        for (const token of tokens) await authenticator.authenticate(token);
        return tokens.length / ((performance.now() - started) / 1000);
      };
      report(
        "A1 verifications/s of new tokens, one core",
        `HS256 ${Math.round(await fresh("HS256"))}, ES256 ${Math.round(await fresh("ES256"))}`,
      );
      await jwksServer.shutdown();
    }
    if (want("P2")) {
      // P2: live latency at a steady rate; then the highest rate it keeps up with.
      console.error("P2 latency ...");
      await sql.query("CREATE TABLE lat_t(id int primary key, pad text)");
      const p2Slot = await init(server.url);
      const writers: pg.Client[] = await Promise.all(Array.from({ length: 4 }, async () => {
        const client = new pg.Client(db);
        await client.connect();
        return client;
      }));
      let nextId = 1;
      const runRate = async (rate: number, seconds: number) => {
        const sentAt = new Map<number, number>();
        const latencies: number[] = [];
        const commits: number[] = [];
        const total = rate * seconds;
        const firstId = nextId;
        nextId += total;
        const received = drain(server.url, p2Slot, total, (change) => {
          const id = change.columnvalues![0] as number;
          const t = sentAt.get(id);
          if (t !== undefined) latencies.push(performance.now() - t);
        });
        await sleep(50); // let the socket open before the first commit
        const start = performance.now();
        const inflight: Promise<unknown>[] = [];
        for (let i = 0; i < total; i++) {
          const due = start + (i * 1000) / rate;
          const wait = due - performance.now();
          if (wait > 1) await sleep(wait);
          const id = firstId + i;
          const sent = performance.now();
          sentAt.set(id, sent);
          inflight.push(
            writers[i % writers.length].query("INSERT INTO lat_t VALUES ($1, 'x')", [id])
              .then(() => commits.push(performance.now() - sent)),
          );
          if (inflight.length > 2000) await Promise.all(inflight.splice(0));
        }
        await Promise.all(inflight);
        const writeSeconds = (performance.now() - start) / 1000;
        await received;
        latencies.sort((a, b) => a - b);
        commits.sort((a, b) => a - b);
        return {
          commitP50: percentile(commits, 0.5),
          commitP99: percentile(commits, 0.99),
          achieved: total / writeSeconds,
          p50: percentile(latencies, 0.5),
          p99: percentile(latencies, 0.99),
        };
      };
      // pg_recvlogical follows the same changes live, for the CPU it spends on them.
      await sql.query("CREATE PUBLICATION lat_pub FOR TABLE lat_t");
      await sql.query("SELECT pg_create_logical_replication_slot('lim_p2', 'pgoutput')");
      const follower = new Deno.Command("pg_recvlogical", {
        args: recvlogicalArgs(db, "lim_p2", undefined, "lat_pub"),
        stdout: "null",
        stderr: "null",
      }).spawn();
      const serverCpu = await cpuSeconds(server.pid);
      const steady = await runRate(1000, P2_SECONDS);
      const steadyCpu = await cpuSeconds(server.pid) - serverCpu;
      const endLsn = (await sql.query("SELECT pg_current_wal_lsn()::text AS lsn")).rows[0].lsn;
      const followed = Date.now() + 30_000;
      while (
        !(await sql.query(
          "SELECT confirmed_flush_lsn >= $1::pg_lsn AS ok FROM pg_replication_slots WHERE slot_name = 'lim_p2'",
          [endLsn],
        )).rows[0].ok
      ) {
        if (Date.now() > followed) throw new Error("pg_recvlogical did not catch up in 30 s");
        await sleep(100);
      }
      const followerCpu = await cpuSeconds(follower.pid);
      follower.kill("SIGINT");
      await follower.status;
      await sql.query("SELECT pg_drop_replication_slot('lim_p2')");
      report(
        `P2 latency at 1000 tx/s for ${P2_SECONDS} s`,
        `p50 ${steady.p50.toFixed(2)} ms, p99 ${steady.p99.toFixed(2)} ms`,
        `commit alone: p50 ${steady.commitP50.toFixed(2)} ms, p99 ${
          steady.commitP99.toFixed(2)
        } ms`,
        `(insert sent -> frame parsed; achieved ${
          Math.round(steady.achieved)
        } tx/s; target p50 <= 2, p99 <= 5)`,
      );
      const perLive = (cpu: number) => cpu / (1000 * P2_SECONDS / 100_000);
      report(
        "P2 CPU per 100k live changes (user + sys)",
        `server ${perLive(steadyCpu).toFixed(3)} s`,
        `pg_recvlogical ${perLive(followerCpu).toFixed(3)} s`,
        `ratio ${(steadyCpu / followerCpu).toFixed(2)}x (one change per transaction)`,
      );
      let best = 1000;
      for (const rate of [2000, 4000, 8000, 16000]) {
        const result = await runRate(rate, QUICK ? 2 : 5);
        console.error(
          `    ${rate} tx/s: achieved ${Math.round(result.achieved)}, p50 ${
            result.p50.toFixed(1)
          } ms, p99 ${result.p99.toFixed(1)} ms`,
        );
        if (result.achieved < rate * 0.95 || result.p99 > 50) break;
        best = rate;
      }
      report(
        "P2 highest steady rate kept (p99 <= 50 ms)",
        `${best} tx/s`,
        "",
        "(one-row transactions, 4 writer connections)",
      );
      await Promise.all(writers.map((w: pg.Client) => w.end()));
    }
    if (want("P2CPU")) {
      // P2CPU: live OLTP, one-row transactions from pgbench (-R, 4 clients, durable commits), the
      // server (a v2 stream, a consumer acknowledging every transaction) and pg_recvlogical
      // (pgoutput to /dev/null) following the same load at once, both over TCP: CPU per transaction
      // of each, at three rates, and commit -> consumer latency.
      console.error("P2CPU live CPU per transaction ...");
      await sql.query(
        "CREATE TABLE oltp_t(id bigserial primary key, ts timestamptz NOT NULL DEFAULT clock_timestamp())",
      );
      await sql.query("CREATE PUBLICATION oltp_pub FOR TABLE oltp_t");
      await createStream(server.url, { name: "oltp", tables: ["oltp_t"] });
      const script = await Deno.makeTempFile({ suffix: ".sql" });
      await Deno.writeTextFile(script, "INSERT INTO oltp_t DEFAULT VALUES;\n");
      const seconds = QUICK ? 10 : 30;
      for (const rate of P2CPU_RATES) {
        await sql.query("SELECT pg_create_logical_replication_slot('lim_oltp', 'pgoutput')");
        const follower = new Deno.Command("pg_recvlogical", {
          args: recvlogicalArgs(db, "lim_oltp", undefined, "oltp_pub"),
          stdout: "null",
          stderr: "null",
        }).spawn();
        const latencies: number[] = [];
        let transactions = 0;
        const consumer = connectStream({
          url: server.url,
          stream: "oltp",
          reconnect: { maxAttempts: 0 },
        });
        const consuming = (async () => {
          for await (const tx of consumer) {
            transactions++;
            const now = Date.now();
            for (const change of tx.changes) {
              if (change.kind === "insert") {
                latencies.push(now - Date.parse((change as RowChange).columnvalues![1] as string));
              }
            }
          }
        })().catch(() => {});
        await sleep(500);
        const serverBefore = await cpuSeconds(server.pid);
        const followerBefore = await cpuSeconds(follower.pid);
        const bench = await new Deno.Command("pgbench", {
          args: [
            ...connectionArgs(db),
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-R",
            String(rate),
            "-T",
            String(seconds),
            "-f",
            script,
          ],
          env: ASYNC_COMMIT ? { PGOPTIONS: "-c synchronous_commit=off" } : {},
          stdout: "piped",
          stderr: "piped",
        }).output();
        if (!bench.success) {
          throw new Error(`pgbench failed: ${new TextDecoder().decode(bench.stderr)}`);
        }
        const done = Number(
          /number of transactions actually processed: (\d+)/.exec(
            new TextDecoder().decode(bench.stdout),
          )?.[1] ?? 0,
        );
        const endLsn = (await sql.query("SELECT pg_current_wal_lsn()::text AS lsn")).rows[0].lsn;
        const deadline = Date.now() + 60_000;
        while (Date.now() < deadline) {
          const { rows: [caught] } = await sql.query(
            `SELECT bool_and(confirmed_flush_lsn >= $1::pg_lsn) AS ok FROM pg_replication_slots
              WHERE slot_name = 'lim_oltp' OR slot_name IN (SELECT slot_name FROM pgdeltastream.streams WHERE name = 'oltp')`,
            [endLsn],
          );
          if (caught.ok && transactions >= done) break;
          await sleep(100);
        }
        const serverCpu = await cpuSeconds(server.pid) - serverBefore;
        const followerCpu = await cpuSeconds(follower.pid) - followerBefore;
        follower.kill("SIGINT");
        await follower.status;
        await consumer.close();
        await consuming;
        await sql.query("SELECT pg_drop_replication_slot('lim_oltp')");
        latencies.sort((a, b) => a - b);
        const us = (cpu: number) => (cpu * 1e6) / done;
        report(
          `P2CPU ${rate} tx/s for ${seconds} s${
            ASYNC_COMMIT ? ", synchronous_commit=off" : ""
          }: CPU per live transaction`,
          `server ${us(serverCpu).toFixed(0)} µs`,
          `pg_recvlogical ${us(followerCpu).toFixed(0)} µs`,
          `ratio ${(serverCpu / followerCpu).toFixed(2)}x (goal <= 2x at 1000); ${done} tx, ` +
            `${transactions} delivered; commit -> consumer p50 ${percentile(latencies, 0.5)} ms, ` +
            `p99 ${percentile(latencies, 0.99)} ms`,
        );
      }
      await Deno.remove(script);
      await deleteAt(server.url, "/v2/streams/oltp");
    }
    if (want("P3")) {
      // P3: snapshot of a large table: streaming export and v1 pages, next to COPY.
      console.error("P3 snapshot ...");
      await sql.query("CREATE TABLE snap_t(id bigint primary key, a int, b text, c timestamptz)");
      await sql.query(
        `INSERT INTO snap_t SELECT g, g % 1000, md5(g::text), now() FROM generate_series(1, ${P3_ROWS}) g`,
      );
      await sql.query("VACUUM ANALYZE snap_t");
      const p3Slot = await init(server.url);
      const copyMs = await timed("psql", [...psqlArgs, "-c", "COPY snap_t TO STDOUT"]);
      await resetPeak(server.pid);
      let started = performance.now();
      const exported = await fetch(new URL("/v1/snapshot/export", server.url), {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ slotName: p3Slot, table: "snap_t" }),
      });
      let lines = 0;
      for await (const part of exported.body!) {
        for (let at = part.indexOf(10); at >= 0; at = part.indexOf(10, at + 1)) lines++;
      }
      const exportMs = performance.now() - started;
      if (lines !== P3_ROWS) throw new Error(`export returned ${lines} rows`);
      report(
        `P3 export ${P3_ROWS} rows (NDJSON), 2 readers`,
        `${Math.round(P3_ROWS / (exportMs / 1000))} rows/s`,
        `${Math.round(P3_ROWS / (copyMs / 1000))} rows/s COPY`,
        `ratio ${(copyMs / exportMs).toFixed(2)}x (target >= 0.5x; one cursor before: 0.29x)`,
      );
      report(
        "P4 peak server RSS during P3 export",
        `${(await peakRssMiB(server.pid)).toFixed(0)} MiB`,
      );
      const page = async (offset: number, limit: number, after?: number) => {
        const t = performance.now();
        const response = await fetch(new URL("/v1/snapshot/data", server.url), {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ slotName: p3Slot, table: "snap_t", offset, limit, after }),
        });
        await response.arrayBuffer();
        return performance.now() - t;
      };
      started = performance.now();
      for (let offset = 0; offset < P3_ROWS; offset += 100_000) await page(offset, 100_000);
      const pagedMs = performance.now() - started;
      report(
        `P3 v1 pages of 100k, whole table`,
        `${Math.round(P3_ROWS / (pagedMs / 1000))} rows/s`,
        "",
        `ratio ${(copyMs / pagedMs).toFixed(2)}x COPY`,
      );
      const first = await page(0, 1000);
      const deep = await page(P3_ROWS - 100_000, 1000);
      report(
        "P3 v1 page of 1000 at offset 0 vs 900k",
        `${first.toFixed(1)} ms vs ${deep.toFixed(1)} ms`,
        "",
        "(OFFSET cost; use export for whole tables)",
      );
      const keysetFirst = await page(0, 1000, 0);
      const keysetDeep = await page(0, 1000, P3_ROWS - 100_000);
      report(
        "P3 keyset page of 1000 (after) at start vs 900k",
        `${keysetFirst.toFixed(1)} ms vs ${keysetDeep.toFixed(1)} ms`,
        "",
        "(flat in the offset)",
      );
      {
        // The same export with one reader (EXPORT_READERS=1): what the parallel readers add.
        await using single = await ServerProcess.spawn(db, { EXPORT_READERS: "1" }, serverFlags);
        const singleSlot = await init(single.url);
        const t = performance.now();
        const response = await fetch(new URL("/v1/snapshot/export", single.url), {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ slotName: singleSlot, table: "snap_t" }),
        });
        await response.arrayBuffer();
        const singleMs = performance.now() - t;
        report(
          "P3 export, 1 reader",
          `${Math.round(P3_ROWS / (singleMs / 1000))} rows/s`,
          "",
          `ratio ${(copyMs / singleMs).toFixed(2)}x COPY`,
        );
      }
    }
    if (want("P6")) {
      // P6: a backfill of a large table through a stream's websocket, next to COPY of the same rows
      // in the same order; and the latency of live changes with and without a backfill running.
      console.error("P6 backfill ...");
      await sql.query(
        "CREATE TABLE IF NOT EXISTS snap_t(id bigint primary key, a int, b text, c timestamptz)",
      );
      if ((await sql.query("SELECT count(*)::int AS n FROM snap_t")).rows[0].n === 0) {
        await sql.query(
          `INSERT INTO snap_t SELECT g, g % 1000, md5(g::text), now() FROM generate_series(1, ${P3_ROWS}) g`,
        );
        await sql.query("VACUUM ANALYZE snap_t");
      }
      await sql.query(
        "CREATE TABLE p6_live(id bigserial primary key, at timestamptz NOT NULL DEFAULT clock_timestamp())",
      );
      const copyMs = await timed("psql", [
        ...psqlArgs,
        "-c",
        "COPY (SELECT id, a, b, c FROM snap_t ORDER BY id) TO STDOUT",
      ]);
      await createStream(server.url, { name: "p6", tables: ["snap_t", "p6_live"] });
      const url = new URL("/v2/streams/p6/changes", server.url);
      url.protocol = "ws:";
      const socket = new WebSocket(url);
      await new Promise((resolve) => socket.addEventListener("open", resolve, { once: true }));
      let rows = 0;
      let latencies: number[] = [];
      const done = Promise.withResolvers<void>();
      socket.addEventListener("message", (event) => {
        const text = event.data as string;
        const nextlsn = /"nextlsn":"([^"]+)"/.exec(text)![1];
        socket.send(JSON.stringify({ lsn: nextlsn }));
        if (text.length < 4096) {
          // A live change: its commit-to-consumer latency.
          for (const change of JSON.parse(text).change) {
            if (change.kind === "insert") {
              latencies.push(Date.now() - Date.parse(change.columnvalues[1]));
            }
            if (change.kind === "backfill" && change.state === "done") done.resolve();
          }
          return;
        }
        for (
          let at = text.indexOf('"kind":"read"');
          at >= 0;
          at = text.indexOf('"kind":"read"', at + 1)
        ) rows++;
        if (text.includes('"state":"done"')) done.resolve();
      });
      const live = new pg.Client(db);
      await live.connect();
      let writing = true;
      const writer = (async () => {
        while (writing) {
          await live.query("INSERT INTO p6_live DEFAULT VALUES");
          await sleep(10);
        }
      })();
      await sleep(QUICK ? 2000 : 5000);
      const quiet = latencies.sort((a, b) => a - b);
      latencies = [];
      await resetPeak(server.pid);
      const cpuBefore = await cpuSeconds(server.pid);
      const started = performance.now();
      const accepted = await postJson(new URL("/v2/streams/p6/backfills", server.url), {
        table: "snap_t",
      });
      if (accepted.status !== 202) throw new Error(`backfill: ${accepted.status} ${accepted.text}`);
      await done.promise;
      const backfillMs = performance.now() - started;
      const cpu = await cpuSeconds(server.pid) - cpuBefore;
      writing = false;
      await writer;
      await live.end();
      socket.close();
      if (rows !== P3_ROWS) throw new Error(`backfill sent ${rows} rows`);
      const during = latencies.sort((a, b) => a - b);
      report(
        `P6 backfill ${P3_ROWS} rows through the websocket (chunks of 10k)`,
        `${Math.round(P3_ROWS / (backfillMs / 1000))} rows/s`,
        `${Math.round(P3_ROWS / (copyMs / 1000))} rows/s COPY (SELECT … ORDER BY id)`,
        `ratio ${(copyMs / backfillMs).toFixed(2)}x (goal >= 0.5x); server CPU ${
          (cpu * 1e6 / P3_ROWS).toFixed(1)
        } µs/row; peak RSS ${(await peakRssMiB(server.pid)).toFixed(0)} MiB`,
      );
      report(
        "P6 live changes at 100 tx/s: commit -> consumer",
        `during the backfill p50 ${percentile(during, 0.5)} ms, p99 ${percentile(during, 0.99)} ms`,
        `without p50 ${percentile(quiet, 0.5)} ms, p99 ${percentile(quiet, 0.99)} ms`,
      );
      await deleteAt(server.url, "/v2/streams/p6");
    }
    if (want("P5")) {
      // P5: relay mode. One stream at a steady rate, many websocket consumers over 2 instances,
      // fed from the stream's JetStream log; then how far the same fan-out goes without relay
      // mode, where each consumer needs a stream (a slot and a walsender) of its own.
      console.error("P5 relay fan-out ...");
      await using nats = await NatsServer.start();
      const instances = [];
      for (const name of ["p5a", "p5b"]) {
        instances.push(
          await ServerProcess.spawn(db, { NATS_URL: nats.url, RELAY_INSTANCE: name }, serverFlags),
        );
      }
      try {
        await sql.query("CREATE TABLE p5(id bigserial primary key, t float8)");
        const consumers = QUICK ? 200 : 1000;
        // The issue's load (1,000 tx/s to 1,000 consumers: 1M deliveries/s offered), then a tenth.
        for (const [rate, seconds] of [[1000, QUICK ? 3 : 5], [100, QUICK ? 5 : 10]]) {
          await createStream(instances[0].url, { name: `p5-${rate}`, tables: ["p5"] });
          const total = rate * seconds;
          let delivered = 0;
          const latencies: number[] = [];
          const sockets: WebSocket[] = [];
          const finished: Promise<void>[] = [];
          for (let i = 0; i < consumers; i++) {
            const url = new URL(
              `/v2/streams/p5-${rate}/changes?consumer=c${i}`,
              instances[i % 2].url,
            );
            url.protocol = "ws:";
            const socket = new WebSocket(url);
            sockets.push(socket);
            // A light consumer (no JSON.parse): one process plays all of them on the same 2 cores.
            let seen = 0;
            const done = Promise.withResolvers<void>();
            finished.push(done.promise);
            socket.onmessage = (event) => {
              const text = event.data as string;
              const lsn = /"nextlsn":"([^"]+)"/.exec(text)![1];
              if (i < 10) {
                const t = /"columnvalues":\[\d+,([\d.e+]+)\]/.exec(text);
                if (t) latencies.push(Date.now() - Number(t[1]));
              }
              delivered++;
              if (++seen % 20 === 0 || seen === total) socket.send(JSON.stringify({ lsn }));
              if (seen === total) done.resolve();
            };
            await new Promise((resolve, reject) => {
              socket.onopen = resolve;
              socket.onerror = () => reject(new Error(`P5 consumer ${i} could not connect`));
            });
          }
          const cpu0 = await Promise.all(instances.map((s) => cpuSeconds(s.pid)));
          const others0 = [await cpuSeconds(nats.pid), await cpuSeconds(Deno.pid)];
          const started = performance.now();
          const writers = new pg.Pool({ ...db, max: 4 });
          for (let tick = 0; tick < seconds * 100; tick++) {
            const due = started + tick * 10;
            const wait = due - performance.now();
            if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
            await Promise.all(
              Array.from(
                { length: rate / 100 },
                () =>
                  writers.query(
                    "INSERT INTO p5(t) VALUES (extract(epoch FROM clock_timestamp()) * 1000)",
                  ),
              ),
            );
          }
          const written = performance.now();
          await writers.end();
          // Wait for every delivery, or 60 s: where it cannot keep up, that shows.
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            Promise.all(finished),
            new Promise((resolve) => (timer = setTimeout(resolve, 60_000))),
          ]);
          clearTimeout(timer);
          const elapsed = (performance.now() - started) / 1000;
          const cpu = await Promise.all(
            instances.map((s, i) => cpuSeconds(s.pid).then((c) => c - cpu0[i])),
          );
          const rss = await Promise.all(instances.map((s) => rssMiB(s.pid)));
          const others = [await cpuSeconds(nats.pid), await cpuSeconds(Deno.pid)].map((c, i) =>
            c - others0[i]
          );
          latencies.sort((a, b) => a - b);
          report(
            `P5 relay: ${rate} tx/s for ${seconds} s to ${consumers} consumers over 2 instances`,
            `${Math.round(delivered / elapsed)} deliveries/s`,
            `${rate * consumers} offered/s`,
            `${(delivered / (total * consumers) * 100).toFixed(1)}% delivered in ${
              elapsed.toFixed(1)
            } s ` +
              `(writer took ${((written - started) / 1000).toFixed(1)} s)`,
          );
          report(
            `P5 commit → consumer latency (10 sampled consumers, ${latencies.length} samples)`,
            `p50 ${percentile(latencies, 0.5).toFixed(0)} ms, p99 ${
              percentile(latencies, 0.99).toFixed(0)
            } ms`,
          );
          report(
            "P5 CPU over the run: instances (RSS at the end); nats-server; the consumers' process",
            instances.map((_, i) => `${cpu[i].toFixed(1)} s (${rss[i].toFixed(0)} MiB)`).join(", "),
            `nats-server ${others[0].toFixed(1)} s; consumers ${others[1].toFixed(1)} s`,
          );
          for (const socket of sockets) socket.close();
          await Promise.all(
            sockets.map((s) =>
              s.readyState === WebSocket.CLOSED
                ? undefined
                : new Promise((resolve) => s.addEventListener("close", resolve))
            ),
          );
          await deleteAt(instances[0].url, `/v2/streams/p5-${rate}`);
        }
      } finally {
        for (const instance of instances) await instance.kill("SIGKILL");
      }
      // Without relay: each consumer needs its own stream; create them until PostgreSQL refuses.
      const [{ max_replication_slots: slots, max_wal_senders: senders }] = (await sql.query(
        "SELECT current_setting('max_replication_slots') AS max_replication_slots, current_setting('max_wal_senders') AS max_wal_senders",
      )).rows;
      let made = 0;
      let refusal = "";
      for (; made < 1000; made++) {
        const response = await postJson(new URL("/v2/streams", server.url), {
          name: `direct-${made}`,
          tables: ["p5"],
        });
        if (response.status !== 201) {
          refusal = `${response.status}: ${JSON.parse(response.text).error}`;
          break;
        }
      }
      report(
        "P5 without relay: streams (one per consumer) before PostgreSQL refuses",
        `${made} streams`,
        `max_replication_slots ${slots}, max_wal_senders ${senders}`,
        refusal.slice(0, 90),
      );
      for (let i = 0; i < made; i++) {
        await deleteAt(server.url, `/v2/streams/direct-${i}`);
      }
    }
    if (want("M1")) {
      // M1: a slow reader over a backlog; M2: one huge transaction. Peak server RSS for each.
      // Memory scenarios each get a fresh server: V8 keeps the heap an earlier phase grew.
      await server.kill("SIGTERM");
      server = await ServerProcess.spawn(db, {}, serverFlags);
      report("server RSS at start", `${(await rssMiB(server.pid)).toFixed(0)} MiB`);
      console.error("M1 slow reader ...");
      await sql.query(
        "CREATE TABLE IF NOT EXISTS bench_t(id bigserial primary key, a int, b text, c timestamptz default now())",
      );
      await sql.query("TRUNCATE bench_t");
      const m1Slot = await init(server.url);
      await sql.query(`DO $$ BEGIN FOR i IN 1..${M1_ROWS / 100} LOOP
      INSERT INTO bench_t(a, b) SELECT g, md5(g::text) FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`);
      await resetPeak(server.pid);
      const m1Started = performance.now();
      await slowDrain(server.url, m1Slot, M1_ROWS, 64 * 1024, 10);
      report(
        `M1 peak server RSS, slow reader over ${M1_ROWS}-row backlog`,
        `${(await peakRssMiB(server.pid)).toFixed(0)} MiB`,
        "",
        `(reader ~6 MB/s, ${
          ((performance.now() - m1Started) / 1000).toFixed(1)
        } s; target < 150 MB)`,
      );
    }
    if (want("M2")) {
      await server.kill("SIGTERM");
      server = await ServerProcess.spawn(db, {}, serverFlags);
      console.error("M2 huge transaction ...");
      await sql.query("CREATE TABLE huge_t(id int primary key, b text)");
      const m2Slot = await init(server.url);
      await sql.query(
        `INSERT INTO huge_t SELECT g, md5(g::text) FROM generate_series(1, ${M2_ROWS}) g`,
      );
      await resetPeak(server.pid);
      const hugeMs = await drain(server.url, m2Slot, M2_ROWS);
      report(
        `M2 peak server RSS, one ${M2_ROWS}-row transaction`,
        `${(await peakRssMiB(server.pid)).toFixed(0)} MiB`,
        "",
        `(${Math.round(M2_ROWS / (hugeMs / 1000))} rows/s; target < 150 MB)`,
      );
    }
  } finally {
    await sql.end();
    await server.kill("SIGTERM");
    await postgres.stop();
    await Deno.remove(dataDir, { recursive: true });
  }
  if (want("F1")) await failover();

  const widths = [0, 1, 2, 3].map((c) => Math.max(...results.map((r) => r[c].length), 8));
  const row = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  console.log(
    `\npgdeltastream bench (${machine}); reproduce: deno task bench${QUICK ? " --quick" : ""}\n`,
  );
  console.log(row(["metric", "pgdeltastream", "baseline", "note"]));
  console.log(row(widths.map((w) => "-".repeat(w))));
  for (const r of results) console.log(row(r));
  if (PROFILE_DIR) await printProfile(PROFILE_DIR);
}

/**
 * F1: a failover of the database under a writer (PostgreSQL 17, failover slots synced to a hot
 * standby): the old primary killed with SIGKILL, the standby promoted. How long from the kill to
 * the new primary's first change at a consumer; transactions sent twice on resume (at most the
 * unacknowledged window); changes lost (must be none).
 */
async function failover(): Promise<void> {
  console.error("F1 failover ...");
  await using pair = await startStandbyPair(
    "CREATE TABLE items(id int primary key, v int)",
    { syncSlots: true },
  );
  const { primary, standby } = pair;
  await using server = await ServerProcess.spawn(primary.database, {
    DATABASE_URL:
      `postgresql://postgres@127.0.0.1:${primary.port},127.0.0.1:${standby.port}/postgres?sslmode=disable&connect_timeout=5`,
    SLOT_BUSY_TIMEOUT_SECONDS: "5",
  }, serverFlags);
  await createStream(server.url, { name: "items", tables: ["items"] });
  // A raw consumer that acks every frame and counts what comes twice.
  const seen = new Set<number>();
  let twice = 0;
  let firstAfter: number | undefined;
  let marker = 0;
  let stop = false;
  const consuming = (async () => {
    while (!stop) {
      const socket = new WebSocket(
        new URL("/v2/streams/items/changes", server.url).href.replace(/^http/, "ws"),
      );
      await new Promise<void>((resolve) => {
        socket.onmessage = (event) => {
          const frame = JSON.parse(event.data);
          for (const change of frame.change) {
            if (change.kind !== "insert") continue;
            const id = change.columnvalues[0];
            if (seen.has(id)) twice++;
            seen.add(id);
            if (id === marker && firstAfter === undefined) firstAfter = performance.now();
          }
          if (!frame.partial) socket.send(JSON.stringify({ lsn: frame.nextlsn }));
        };
        socket.onclose = () => resolve();
      });
      await sleep(100);
    }
  })();
  const client = new pg.Client(primary.database);
  await client.connect();
  for (let id = 1; id <= 300; id++) await client.query("INSERT INTO items VALUES ($1, 0)", [id]);
  for (let ready = 0; ready < 1;) {
    await client.query("SELECT pg_log_standby_snapshot()");
    const check = new pg.Client(standby.database);
    await check.connect();
    ready = (await check.query(
      "SELECT count(*)::int AS n FROM pg_replication_slots WHERE synced AND NOT temporary",
    )).rows[0].n;
    await check.end();
    await sleep(200);
  }
  await client.end();
  const killedAt = performance.now();
  await primary.kill();
  await standby.promote();
  const after = new pg.Client(standby.database);
  await after.connect();
  marker = 1_000_000;
  await after.query("INSERT INTO items VALUES ($1, 0)", [marker]);
  while (firstAfter === undefined && performance.now() - killedAt < 120_000) await sleep(20);
  const { rows } = await after.query("SELECT id FROM items");
  await after.end();
  stop = true;
  await server.kill("SIGTERM");
  await consuming;
  const lost = rows.filter((r: { id: number }) => !seen.has(r.id)).length;
  report(
    "F1 failover: kill -9 of the primary → the new primary's first change at the consumer",
    firstAfter === undefined ? "never (120 s)" : `${((firstAfter - killedAt) / 1000).toFixed(2)} s`,
    "goal ≤ 10 s beyond the promotion",
    `${twice} rows sent twice on resume, ${lost} of ${rows.length} lost`,
  );
}

if (import.meta.main) await main();
