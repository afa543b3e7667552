import assert from "node:assert/strict";
import { deadline } from "./support/deadline.ts";
import { ChildProcess } from "./support/harness.ts";

const REPO = new URL("..", import.meta.url).pathname;

/** Copies what a clone of the working tree would hold (tracked and new, not ignored, files) into `target`. */
async function copyCheckout(target: string): Promise<void> {
  const { stdout } = await new Deno.Command("git", {
    args: ["ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd: REPO,
  })
    .output();
  for (const path of new TextDecoder().decode(stdout).split("\0").filter(Boolean)) {
    const from = `${REPO}${path}`;
    if (!await Deno.stat(from).then(() => true, () => false)) continue; // deleted, not yet committed
    await Deno.mkdir(`${target}/${path}`.replace(/\/[^/]*$/, ""), { recursive: true });
    await Deno.copyFile(from, `${target}/${path}`);
  }
}

async function run(cwd: string, args: string[]): Promise<string> {
  const command = new Deno.Command(Deno.execPath(), {
    args,
    cwd,
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  });
  const { success, stdout, stderr } = await deadline(
    command.output(),
    `deno ${args.join(" ")} in ${cwd}`,
    300_000,
  );
  const output = new TextDecoder().decode(stdout) + new TextDecoder().decode(stderr);
  assert.ok(success, `deno ${args.join(" ")} failed in ${cwd}:\n${output}`);
  return output;
}

Deno.test({
  name: "both README commands work from a clone in a private (mode 700) directory, as root",
  ignore: Deno.uid() !== 0,
  async fn(t) {
    const home = await Deno.makeTempDir({ prefix: "pgds-private-" });
    await Deno.chmod(home, 0o700);
    const clone = `${home}/pgdeltastream`;
    let dataDir: string | undefined;
    try {
      await copyCheckout(clone);
      await t.step("deno task test: a test file that starts PostgreSQL passes there", async () => {
        await run(clone, ["task", "setup"]);
        const output = await run(clone, ["test", "--allow-all", "tests/stream_handshake_test.ts"]);
        assert.match(output, /ok \| 1 passed/);
      });
      await t.step(
        "deno task dev: PostgreSQL and the server start there, and stop on Ctrl-C",
        async () => {
          const dev = await ChildProcess.spawn({
            name: "deno task dev",
            args: ["task", "dev"],
            cwd: clone,
            env: {
              PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
              HOME: Deno.env.get("HOME") ?? "/",
              NO_COLOR: "1",
              SERVERPORT: "0",
              DEV_PG_PORT: "0",
            },
            ready: /init: {6}curl (http:\/\/\S+)\/v1\/init/,
          });
          const health = await fetch(`${dev.ready}/healthz`);
          assert.equal(health.status, 200);
          await health.body?.cancel();
          assert.equal((await dev.kill("SIGINT")).code, 0);
          dataDir = /data in ([^\s;)]+)/.exec(await dev.output)?.[1];
        },
      );
    } finally {
      await Deno.remove(home, { recursive: true });
      if (dataDir?.startsWith("/var/tmp/")) {
        // With the folder made for it (dev-<id>), not only the data inside it.
        await Deno.remove(dataDir.replace(/\/postgres$/, ""), { recursive: true });
      }
    }
  },
});
