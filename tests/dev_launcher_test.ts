import assert from "node:assert/strict";
import { poll } from "./support/deadline.ts";
import { ChildProcess, taskFlags } from "./support/harness.ts";

const REPO = new URL("..", import.meta.url).pathname;

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

async function accepts(port: number): Promise<boolean> {
  try {
    (await Deno.connect({ hostname: "127.0.0.1", port })).close();
    return true;
  } catch {
    return false;
  }
}

/** `src/dev/dev.ts` with the dev task's flags, in `cwd` (a fresh, private directory: mode 700). */
async function spawnDev(
  cwd: string,
  env: Record<string, string>,
  args: string[] = [],
): Promise<ChildProcess> {
  return await ChildProcess.spawn({
    name: "deno task dev",
    args: [
      "run",
      "--config",
      `${REPO}deno.json`,
      ...await taskFlags("dev"),
      `${REPO}src/dev/dev.ts`,
      ...args,
    ],
    cwd,
    env: {
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: Deno.env.get("HOME") ?? "/",
      ...env,
    },
    ready: /init: {6}curl (http:\/\/\S+)\/v1\/init/,
  });
}

/** Where the launcher said its data is (relocated under /var/tmp when postgres cannot reach `cwd`). */
function dataDirOf(output: string): string {
  return /data in ([^\s;)]+)/.exec(output)![1];
}

Deno.test("deno task dev stops its PostgreSQL on every signal it can catch, and recovers from one it cannot", async (t) => {
  const cwd = await Deno.makeTempDir({ prefix: "pgds-dev-" }); // mode 700, like a private home
  const pgPort = freePort();
  const env = { DEV_PG_PORT: String(pgPort), SERVERPORT: "0" };
  const dataDirs = new Set<string>();
  try {
    for (const signal of ["SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT"] as const) {
      await t.step(`${signal} stops the server and PostgreSQL`, async () => {
        const dev = await spawnDev(cwd, env);
        const health = await fetch(`${dev.ready}/healthz`);
        assert.equal(health.status, 200);
        await health.body?.cancel();
        assert.equal((await dev.kill(signal)).code, 0);
        const output = await dev.output;
        dataDirs.add(dataDirOf(output));
        // What deno task start says at start-up, dev says too; Deno's own notes (no .env) it does not.
        assert.match(output, /startup\.auth: authentication: protected mode/);
        assert.match(output, /startup\.listening: pgdeltastream listening on http/);
        assert.doesNotMatch(output, /Warning|--env-file/);
        assert.equal(await accepts(pgPort), false, "PostgreSQL still accepts connections");
        assert.equal(
          await Deno.stat(`${dataDirOf(output)}/postmaster.pid`).then(() => true, () => false),
          false,
          "postmaster.pid is left",
        );
      });
    }

    await t.step(
      "kill -9 leaves PostgreSQL running; the next start stops it and starts afresh",
      async () => {
        const first = await spawnDev(cwd, env);
        await first.kill("SIGKILL");
        assert.equal(
          await accepts(pgPort),
          true,
          "PostgreSQL outlives a launcher killed by SIGKILL",
        );
        const second = await spawnDev(cwd, env);
        const health = await fetch(`${second.ready}/healthz`);
        assert.equal(health.status, 200);
        await health.body?.cancel();
        assert.equal((await second.kill("SIGTERM")).code, 0);
        assert.match(await second.output, /stopping PostgreSQL \d+ left running/);
        assert.equal(await accepts(pgPort), false);
      },
    );

    await t.step(
      "a stale postmaster.pid naming a live process that is not PostgreSQL is removed",
      async () => {
        const [dataDir] = dataDirs;
        // This test's own pid: alive, so PostgreSQL itself would refuse to start over it.
        await Deno.writeTextFile(
          `${dataDir}/postmaster.pid`,
          `${Deno.pid}\n${dataDir}\n1700000000\n${pgPort}\n`,
        );
        const dev = await spawnDev(cwd, env);
        const health = await fetch(`${dev.ready}/healthz`);
        assert.equal(health.status, 200);
        await health.body?.cancel();
        assert.equal((await dev.kill("SIGTERM")).code, 0);
        assert.match(await dev.output, /removing stale \S+postmaster\.pid \(process \d+ is not/);
      },
    );

    await t.step("--reset starts with an empty database; a plain restart keeps it", async () => {
      const slotNames = async (dev: ChildProcess): Promise<string[]> => {
        const response = await fetch(`${dev.ready}/v2/status`);
        const report = await response.json() as { slots?: { slotName: string }[] };
        return (report.slots ?? []).map((slot) => slot.slotName);
      };
      const first = await spawnDev(cwd, env);
      const { slotName } = await (await fetch(`${first.ready}/v1/init`)).json();
      assert.equal((await first.kill("SIGTERM")).code, 0);

      const second = await spawnDev(cwd, env);
      assert.ok((await slotNames(second)).includes(slotName), "the slot survives a restart");
      assert.equal((await second.kill("SIGTERM")).code, 0);

      const third = await spawnDev(cwd, env, ["--reset"]);
      assert.deepEqual(await slotNames(third), [], "a slot is left after --reset");
      assert.equal((await third.kill("SIGTERM")).code, 0);
      assert.match(await third.output, /Removed the dev database in \S+/);
    });

    await t.step("when PostgreSQL cannot start, its own log says why", async () => {
      const taken = Deno.listen({ hostname: "127.0.0.1", port: pgPort });
      try {
        const error = await spawnDev(cwd, env).then(
          async (dev) => {
            await dev.kill();
            throw new Error("the launcher started");
          },
          (error: Error) => error,
        );
        assert.match(error.message, /exited with code 1/);
        assert.match(error.message, /could not (bind|create any TCP\/IP sockets)/);
      } finally {
        taken.close();
      }
    });

    await t.step("when the server cannot start, PostgreSQL is stopped too", async () => {
      const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      try {
        const serverPort = (taken.addr as Deno.NetAddr).port;
        const error = await spawnDev(cwd, { ...env, SERVERPORT: String(serverPort) }).then(
          async (dev) => {
            await dev.kill();
            throw new Error("the launcher started");
          },
          (error: Error) => error,
        );
        assert.match(error.message, /the server cannot start/);
        await poll(async () => !await accepts(pgPort), "PostgreSQL to stop");
      } finally {
        taken.close();
      }
    });
  } finally {
    // A data directory relocated under /var/tmp goes with the folder made for it (dev-<id>).
    const relocated = [...dataDirs].filter((d) => d.startsWith("/var/tmp/")).map((d) =>
      d.replace(/\/postgres$/, "")
    );
    for (const dir of [cwd, ...dataDirs, ...relocated]) {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  }
});
