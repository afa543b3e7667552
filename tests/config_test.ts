import assert from "node:assert/strict";
import { ENV_VARS, loadConfig } from "../src/config.ts";
import { withValueSettings } from "../src/postgres/database.ts";
import { runtimeFlags, taskEnv, taskWords } from "./support/harness.ts";

const env = (vars: Record<string, string>) => (name: string) => vars[name];

Deno.test("loadConfig() reads the seed's variable names", () => {
  const config = loadConfig(env({
    DBNAME: "app",
    PGUSER: "alice",
    PGPASS: "''",
    PGHOST: "db.internal",
    PGPORT: "6543",
    SERVERHOST: "0.0.0.0",
    SERVERPORT: "9000",
  }));
  assert.deepEqual(
    [
      config.database.database,
      config.database.user,
      config.database.password,
      config.database.host,
    ],
    ["app", "alice", "", "db.internal"],
  );
  assert.equal(config.database.port, 6543);
  assert.equal(config.hostname, "0.0.0.0");
  assert.equal(config.port, 9000);
});

Deno.test("loadConfig() falls back to libpq names, PORT and defaults", () => {
  const config = loadConfig(
    env({ PGDATABASE: "shop", PGPASSWORD: "s3cret", PORT: "8080", USER: "bob" }),
  );
  assert.equal(config.database.database, "shop");
  assert.equal(config.database.password, "s3cret");
  assert.equal(config.database.user, "bob");
  assert.equal(config.port, 8080);
  assert.equal(loadConfig(env({ PORT: "8080", SERVERPORT: "9000" })).port, 9000);
  const defaults = loadConfig(env({}));
  assert.equal(defaults.port, 12312);
  assert.equal(defaults.database.host, "localhost");
});

Deno.test("loadConfig() keeps DATABASE_URL and rejects bad values with the variable's name", () => {
  const url = "postgres://u:p@h:5433/d";
  assert.equal(loadConfig(env({ DATABASE_URL: url })).database.connectionString, url);
  assert.throws(() => loadConfig(env({ DATABASE_URL: "mysql://x" })), /DATABASE_URL/);
  assert.throws(() => loadConfig(env({ PGPORT: "70000" })), RangeError);
  assert.throws(() => loadConfig(env({ SERVERPORT: "abc" })), /SERVERPORT/);
  assert.throws(() => loadConfig(env({ SNAPSHOT_TTL_SECONDS: "0" })), /SNAPSHOT_TTL_SECONDS/);
  assert.throws(() => loadConfig(env({ PUBLICATION_PREFIX: "Bad-Name" })), /PUBLICATION_PREFIX/);
});

Deno.test("deno task start allows exactly the environment variables the server reads", async () => {
  const words = await taskWords("start");
  const allowed = words.find((w) => w.startsWith("--allow-env="))!.slice("--allow-env=".length)
    .split(",");
  assert.deepEqual(allowed.sort(), [...ENV_VARS].sort());
  assert.ok(!words.includes("-A") && !words.includes("--allow-all"));
});

Deno.test("the Dockerfile and the binary run with deno task start's permission and V8 flags", async () => {
  const dockerfile = await Deno.readTextFile(new URL("../Dockerfile", import.meta.url));
  const cmd: string[] = JSON.parse(/^CMD (\[.*\])$/m.exec(dockerfile)![1]);
  const startFlags = await runtimeFlags("start");
  assert.deepEqual(cmd.filter((w) => /^--(allow-|v8-flags=)/.test(w)), startFlags);
  assert.equal(cmd.at(-1), "src/main.ts");
  assert.deepEqual(await runtimeFlags("compile"), startFlags);
  // The environment deno task start sets (the allocator's settings) is the image's too.
  const taskVars = Object.entries(await taskEnv("start"));
  assert.ok(taskVars.length > 0, "deno task start sets no environment");
  for (const [name, value] of taskVars) {
    assert.match(dockerfile, new RegExp(`^ENV ${name}=${value}$`, "m"));
  }
});

Deno.test("the operator's PGOPTIONS and DATABASE_URL options are kept beside the pinned value settings", () => {
  assert.equal(
    loadConfig(env({ PGOPTIONS: "-c search_path=app" })).database.options,
    "-c search_path=app",
  );
  const fromUrl = loadConfig(env({
    DATABASE_URL: "postgres://u@h:5433/d?options=-c%20work_mem%3D64MB&sslmode=disable",
  })).database;
  assert.equal(fromUrl.options, "-c work_mem=64MB");
  assert.equal(fromUrl.connectionString, "postgres://u@h:5433/d?sslmode=disable");
  const settled = withValueSettings(fromUrl);
  assert.match(settled.options!, /^-c work_mem=64MB -c bytea_output=hex -c DateStyle=ISO,MDY /);
});

Deno.test("loadConfig() derives the authentication mode and rejects weak or malformed settings", () => {
  assert.equal(loadConfig(env({})).auth.mode, "protected");
  assert.equal(loadConfig(env({ AUTH: "none" })).auth.mode, "none");
  const on = loadConfig(env({
    ADMIN_TOKENS: "a".repeat(16) + ", " + "b".repeat(20),
    ADMIN_TOKEN: "c".repeat(16),
    CORS_ORIGINS: "https://app.example, http://localhost:5173",
  })).auth;
  assert.equal(on.mode, "on");
  assert.deepEqual(on.adminTokens, ["a".repeat(16), "b".repeat(20), "c".repeat(16)]);
  assert.deepEqual(on.corsOrigins, ["https://app.example", "http://localhost:5173"]);
  assert.equal(loadConfig(env({ JWT_SECRET: "s".repeat(32) })).auth.mode, "on");
  assert.throws(() => loadConfig(env({ ADMIN_TOKENS: "short" })), /ADMIN_TOKENS.*16 characters/);
  assert.throws(() => loadConfig(env({ JWT_SECRET: "short" })), /JWT_SECRET.*32 bytes/);
  assert.throws(() => loadConfig(env({ AUTH: "off" })), /AUTH="off" is invalid/);
  assert.throws(() => loadConfig(env({ JWKS_URL: "ftp://x" })), /JWKS_URL/);
  assert.throws(
    () => loadConfig(env({ CORS_ORIGINS: "https://app.example/path" })),
    /CORS_ORIGINS/,
  );
});

Deno.test("loadConfig() reads the log and metrics settings and names a bad value", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  const config = loadConfig(
    env({ LOG_FORMAT: "json", LOG_LEVEL: "warn", METRICS: "off", METRICS_TOKEN: "m".repeat(16) }),
  );
  assert.deepEqual(config.log, { format: "json", level: "warn" });
  assert.deepEqual(config.metrics, { enabled: false, token: "m".repeat(16) });
  assert.deepEqual(loadConfig(env({})).metrics, { enabled: true, token: undefined });
  assert.throws(() => loadConfig(env({ LOG_LEVEL: "verbose" })), /LOG_LEVEL="verbose" is invalid/);
  assert.throws(() => loadConfig(env({ LOG_FORMAT: "xml" })), /LOG_FORMAT="xml" is invalid/);
  assert.throws(() => loadConfig(env({ METRICS_TOKEN: "short" })), /METRICS_TOKEN is invalid/);
});
