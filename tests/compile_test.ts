import assert from "node:assert/strict";
import { init, sql, startPostgres, taskWords } from "./support/harness.ts";

// `deno compile` downloads its runtime (denort) unless DENORT_BIN names a local copy; CI has neither.
const denort = Deno.env.get("DENORT_BIN");

Deno.test({
  name: "deno task compile builds a binary that serves init",
  ignore: denort === undefined,
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      // The compile task's own words, with the output redirected into the temporary directory.
      const words = [...await taskWords("compile"), `--output=${dir}/pgdeltastream`];
      const compile = await new Deno.Command(Deno.execPath(), {
        args: words,
        cwd: new URL("..", import.meta.url).pathname,
      }).output();
      assert.ok(compile.success, new TextDecoder().decode(compile.stderr));
      await using postgres = await startPostgres();
      const db = postgres.database;
      await sql(db, "SELECT 1");
      const child = new Deno.Command(`${dir}/pgdeltastream`, {
        env: { PGHOST: db.host, PGPORT: String(db.port), PGUSER: db.user, SERVERPORT: "0" },
        stdout: "piped",
        stderr: "inherit",
      }).spawn();
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let out = "";
      while (!/listening on (\S+)/.test(out)) out += (await reader.read()).value ?? "";
      const base = new URL(/listening on (\S+)/.exec(out)![1]);
      assert.match(await init(base), /^delta_/);
      child.kill("SIGTERM");
      await child.status;
      await reader.cancel();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
