import assert from "node:assert/strict";
import { ENV_VARS, loadConfig } from "../src/config.ts";
import { withValueSettings } from "../src/postgres/database.ts";
import { runtimeFlags, taskEnv, taskWords } from "./support/harness.ts";
import { serverFlags } from "../src/permissions.ts";
import { poolerHint } from "../src/postgres/preflight.ts";

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

Deno.test("loadConfig() reads DATABASE_URL as libpq does and rejects bad values with the variable's name", () => {
  const url = "postgres://u:p%40ss@h:5433/d";
  const db = loadConfig(env({ DATABASE_URL: url, PGHOST: "ignored", PGUSER: "ignored" })).database;
  assert.deepEqual([db.host, db.port, db.user, db.password, db.database], [
    "h",
    5433,
    "u",
    "p@ss",
    "d",
  ]);
  // A parameter the URL leaves out comes from its PG* variable.
  const mixed = loadConfig(env({
    DATABASE_URL: "postgresql:///shop?host=/var/run/postgresql&sslmode=verify-full",
    PGUSER: "app",
    PGSSLROOTCERT: "/etc/ca.pem",
  })).database;
  assert.deepEqual(
    [mixed.host, mixed.database, mixed.user, mixed.sslmode, mixed.sslrootcert],
    ["/var/run/postgresql", "shop", "app", "verify-full", "/etc/ca.pem"],
  );
  assert.equal(loadConfig(env({ DATABASE_URL: "postgres://[::1]:6000/d" })).database.host, "::1");
  assert.equal(loadConfig(env({})).database.sslmode, "prefer", "libpq's default");
  assert.equal(
    loadConfig(env({ PGSSLROOTCERT: "system" })).database.sslmode,
    "verify-full",
    "sslrootcert=system checks the name too",
  );
  assert.equal(loadConfig(env({ HOME: "/home/app" })).database.passfile, "/home/app/.pgpass");
  assert.equal(loadConfig(env({ PGCONNECT_TIMEOUT: "1" })).database.connectTimeoutSeconds, 2);
  for (
    const [vars, message] of [
      [{ DATABASE_URL: "postgres://u:secret@h/d?sslmode=strict" }, /sslmode="strict" is invalid/],
      [{ DATABASE_URL: "postgres://u:secret@h/d?frobnicate=1" }, /unknown parameter "frobnicate"/],
      [{ DATABASE_URL: "postgres://u:secret@h:99999/d" }, /port is invalid/],
      [{ DATABASE_URL: "postgres://u:secret@h/d?channel_binding=require" }, /not supported/],
      [{ PGSSLROOTCERT: "system", PGSSLMODE: "require" }, /sslrootcert=system needs/],
      [{ PGSSLNEGOTIATION: "direct" }, /sslnegotiation=direct needs sslmode=require/],
    ] as const
  ) {
    // Never with the password in the message.
    assert.throws(
      () => loadConfig(env(vars as Record<string, string>)),
      (error: Error) => message.test(error.message) && !error.message.includes("secret"),
    );
  }
  assert.throws(() => loadConfig(env({ DATABASE_URL: "mysql://x" })), /DATABASE_URL/);
  assert.throws(() => loadConfig(env({ PGPORT: "70000" })), RangeError);
  assert.throws(() => loadConfig(env({ SERVERPORT: "abc" })), /SERVERPORT/);
  assert.throws(() => loadConfig(env({ SNAPSHOT_TTL_SECONDS: "0" })), /SNAPSHOT_TTL_SECONDS/);
  assert.throws(() => loadConfig(env({ PUBLICATION_PREFIX: "Bad-Name" })), /PUBLICATION_PREFIX/);
});

Deno.test("deno task start allows exactly the environment variables the server reads", async () => {
  const words = await taskWords("start");
  const allowed = (flags: string[]) =>
    flags.find((w) => w.startsWith("--allow-env="))!.slice("--allow-env=".length).split(",").sort();
  assert.deepEqual(allowed(words), [...ENV_VARS].sort(), "the launcher's");
  const server = serverFlags(loadConfig(env({})).database);
  assert.deepEqual(allowed(server), [...ENV_VARS].sort(), "the server's");
  for (const flags of [words, server]) {
    assert.ok(!flags.includes("-A") && !flags.includes("--allow-all"));
  }
  // The launcher may run deno, and nothing else.
  assert.deepEqual(words.filter((w) => w.startsWith("--allow-run")), ["--allow-run=deno"]);
});

Deno.test("the server may read exactly the files and socket its database settings name", () => {
  const flags = (vars: Record<string, string>) =>
    serverFlags(loadConfig(env(vars)).database).filter((w) => /^--allow-(read|write)/.test(w));
  assert.deepEqual(flags({ PGPASSWORD: "x" }), [], "nothing on the disk by default");
  assert.deepEqual(
    flags({
      DATABASE_URL:
        "postgresql://u@db/d?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
      HOME: "/home/app",
    }),
    ["--allow-read=/etc/ca.pem,/c.pem,/k.pem,/home/app/.pgpass"],
  );
  assert.deepEqual(
    flags({ PGHOST: "/var/run/postgresql", PGPORT: "5433", PGPASSWORD: "x" }),
    [
      "--allow-read=/var/run/postgresql/.s.PGSQL.5433",
      "--allow-write=/var/run/postgresql/.s.PGSQL.5433",
    ],
  );
  assert.deepEqual(flags({ PGSSLROOTCERT: "system", PGPASSWORD: "x" }), [], "system: no file");
  assert.throws(() => flags({ PGSSLROOTCERT: "/a,b.pem" }), /comma/);
});

Deno.test("the Dockerfile and the binary run with deno task start's permission and V8 flags", async () => {
  const dockerfile = await Deno.readTextFile(new URL("../Dockerfile", import.meta.url));
  const cmd: string[] = JSON.parse(/^CMD (\[.*\])$/m.exec(dockerfile)![1]);
  const at = cmd.indexOf("src/launch.ts");
  assert.ok(at > 0, "the image runs the launcher");
  const launcherFlags = (words: string[]) => words.filter((w) => /^--(allow-|v8-flags=)/.test(w));
  assert.deepEqual(launcherFlags(cmd.slice(0, at)), await runtimeFlags("start"));
  assert.deepEqual(cmd.slice(at + 1), ["--frozen", "--cached-only"], "for the server too");
  // The binary gets the server's flags from the same derivation as the launcher's child.
  const compile = await Deno.readTextFile(new URL("../tools/compile.ts", import.meta.url));
  assert.match(compile, /serverFlags\(loadConfig/);
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
  assert.equal(fromUrl.sslmode, "disable");
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
  assert.deepEqual(config.metrics, {
    enabled: false,
    token: "m".repeat(16),
    historyIntervalMs: 5000,
  });
  assert.deepEqual(loadConfig(env({})).metrics, {
    enabled: true,
    token: undefined,
    historyIntervalMs: 5000,
  });
  assert.throws(() => loadConfig(env({ LOG_LEVEL: "verbose" })), /LOG_LEVEL="verbose" is invalid/);
  assert.throws(() => loadConfig(env({ LOG_FORMAT: "xml" })), /LOG_FORMAT="xml" is invalid/);
  assert.throws(() => loadConfig(env({ METRICS_TOKEN: "short" })), /METRICS_TOKEN is invalid/);
});

Deno.test("a URL that looks like a transaction pooler's is named at start", () => {
  const db = (url: string) => loadConfig(env({ DATABASE_URL: url })).database;
  assert.match(
    poolerHint(db("postgresql://u:secret@ep-cool-1-pooler.eu-central-1.aws.neon.tech/d"))!,
    /looks like a connection pooler.*direct \(session\) URL/,
  );
  assert.match(
    poolerHint(db("postgresql://u@aws-0-eu.pooler.supabase.com:6543/postgres"))!,
    /6543/,
  );
  assert.equal(poolerHint(db("postgresql://u@db.abc.supabase.co:5432/postgres")), undefined);
  assert.doesNotMatch(
    poolerHint(db("postgresql://u:secret@x-pooler.neon.tech/d"))!,
    /secret/,
    "no password in the warning",
  );
});
