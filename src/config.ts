/**
 * Configuration from environment variables: the seed's names, libpq's names,
 * `DATABASE_URL`, and `PORT` as container platforms set it.
 * @module
 */

import { LOG_LEVELS, type LogFormat, type LogLevel } from "./observability/log.ts";
import type { StreamLimits } from "./protocol.ts";
import { parseConnectionUri } from "./postgres/connection_uri.ts";

/** libpq's `target_session_attrs`: which of several hosts a connection may use. */
export const SESSION_ATTRS = [
  "any",
  "read-write",
  "read-only",
  "primary",
  "standby",
  "prefer-standby",
] as const;

/** A value of {@link SESSION_ATTRS}. */
export type SessionAttrs = typeof SESSION_ATTRS[number];

/** One host of a connection: a name, an address or a socket directory, and its port. */
export interface DatabaseHost {
  host: string;
  port: number;
}

/** libpq's `sslmode`s, weakest first. */
export const SSL_MODES = [
  "disable",
  "allow",
  "prefer",
  "require",
  "verify-ca",
  "verify-full",
] as const;

/** How TLS is asked for and how far the server's certificate is checked (libpq's meanings). */
export type SslMode = typeof SSL_MODES[number];

/**
 * Where and how to reach PostgreSQL, resolved as libpq resolves it: a
 * `DATABASE_URL` parameter wins over its `PG*` variable, which wins over
 * the default. Every connection of the server is made from it.
 */
export interface DatabaseConfig {
  /** A host name, an IP address, or a Unix-socket directory (starting with `/`): the first of `hosts`. */
  host: string;
  port: number;
  /**
   * Every host to try, in order (`host=h1,h2`, `PGHOST=h1,h2`): a
   * connection goes to the first that answers and fits `targetSessionAttrs`.
   * Absent: `host` and `port` alone.
   */
  hosts?: DatabaseHost[];
  /** Which host fits (libpq's `target_session_attrs`); default `any`, `read-write` with several hosts. */
  targetSessionAttrs?: SessionAttrs;
  /** Try the hosts in random order (`load_balance_hosts=random`). */
  loadBalanceHosts?: boolean;
  user: string;
  /** The password given (`PGPASSWORD`, the URL); else the password file is asked. */
  password?: string;
  database: string;
  /** Startup options (`-c name=value …`): `PGOPTIONS` and `options` of `DATABASE_URL`. */
  options?: string;
  application_name: string;
  /** libpq's `sslmode`; default `prefer`, as libpq's. */
  sslmode?: SslMode;
  /** A PEM file of the CAs that may sign the server's certificate, or `system` (the runtime's roots). */
  sslrootcert?: string;
  /** A client certificate (PEM) and its key, for `cert` authentication. */
  sslcert?: string;
  sslkey?: string;
  /** `postgres` (an SSLRequest first) or `direct` (TLS at once, PostgreSQL 17+). */
  sslnegotiation?: "postgres" | "direct";
  /** The password file (`PGPASSFILE`, default `~/.pgpass`), read when no password is given. */
  passfile?: string;
  /** How long a connection may take to be ready, in seconds (`connect_timeout`); 0: no limit. */
  connectTimeoutSeconds?: number;
  /** TCP keepalives (`keepalives`, default on) and their idle time (`keepalives_idle`, seconds). */
  keepalives?: boolean;
  keepalivesIdleSeconds?: number;
}

/** The server's whole configuration. */
export interface Config {
  database: DatabaseConfig;
  /** Interface the HTTP server listens on. */
  hostname: string;
  /** Port the HTTP server listens on (0: any free port). */
  port: number;
  /** How long an init's snapshot stays readable, in seconds. */
  snapshotTtlSeconds: number;
  /** How long a stream request waits for a slot still held by a dying connection, in seconds. */
  slotBusyTimeoutSeconds: number;
  /** Name prefix of the publications the server creates and owns. */
  publicationPrefix: string;
  /** A transaction whose changes reach this many bytes is sent as several frames. */
  frameChunkBytes: number;
  /** Rows a backfill's chunk reads at most (and at most {@link frameChunkBytes} of them). */
  backfillChunkRows: number;
  /** Connections that read one table export in parallel. */
  exportReaders: number;
  /** Connections every snapshot read shares (an export holds one while it runs). */
  snapshotReaders: number;
  /** How long a snapshot read waits for one of them before a 503. */
  snapshotReaderWaitMs: number;
  /** Who may do what: tokens, JWT keys, protected mode, allowed origins. */
  auth: AuthConfig;
  /** How the log is written (`LOG_FORMAT`) and from which level (`LOG_LEVEL`). */
  log: { format: LogFormat; level: LogLevel };
  /** Limits of streams created without their own, and of v1 slots (`STREAM_MAX_*`; 0: none). */
  streamLimits: StreamLimits;
  /** How often the WAL guard checks every stream's limits, in ms (`WAL_GUARD_INTERVAL_SECONDS`). */
  walGuardIntervalMs: number;
  /** Relay mode (`NATS_URL`): v2 streams go through NATS JetStream logs; none: direct. */
  relay?: RelayConfig;
  /** Prometheus metrics (`METRICS=off` turns them off); `METRICS_TOKEN` may read them besides admins. */
  metrics: {
    enabled: boolean;
    token?: string;
    /** How often the history of `GET /v2/metrics/history` is sampled (5 s). */
    historyIntervalMs: number;
  };
  /**
   * A replication connection that receives nothing for this long is taken
   * for dead and replaced (`REPLICATION_TIMEOUT_SECONDS`, default 60, as
   * `wal_receiver_timeout`); at half of it the server asks PostgreSQL for a
   * reply. 0: never.
   */
  replicationTimeoutMs: number;
}

/** Relay mode: where NATS is, how long the logs keep frames, and this instance's name. */
export interface RelayConfig {
  /** `NATS_URL`: `nats://host:port` (comma-separated for a cluster). */
  servers: string[];
  /** How long a stream's log keeps a frame (`RELAY_MAX_AGE_SECONDS`, default 7 days). */
  maxAgeSeconds: number;
  /** Largest size of a stream's log before the oldest frames go (`RELAY_MAX_BYTES`, default 1 GiB). */
  maxBytes: number;
  /** Most frames a stream's log keeps (`RELAY_MAX_MESSAGES`; 0: no count limit). */
  maxMessages: number;
  /**
   * Copies NATS keeps of each log and bucket (`RELAY_REPLICAS`, 1 to 5, default 1): 3 in a
   * 3-node cluster, so that losing a node loses nothing.
   */
  replicas: number;
  /** This instance's name in the API and the metrics (`RELAY_INSTANCE`, default random). */
  instance: string;
}

/** How clients authenticate, and which browsers' origins may call. */
export interface AuthConfig {
  /**
   * `on`: credentials are required (admin tokens or JWTs are configured).
   * `protected`: nothing is configured, so only loopback clients are served.
   * `none`: `AUTH=none`, every client may do everything (private networks only).
   */
  mode: "on" | "protected" | "none";
  /** Bearer tokens of admins (`ADMIN_TOKENS`, comma-separated, and `ADMIN_TOKEN`). */
  adminTokens: string[];
  /** Secret of HS256 consumer JWTs (`JWT_SECRET`); also what minted tokens are signed with. */
  jwtSecret?: string;
  /** Where the JWKS of RS256, ES256 and EdDSA consumer JWTs is (`JWKS_URL`). */
  jwksUrl?: string;
  /** What a JWT's `aud` must contain (`JWT_AUDIENCE`). */
  audience: string;
  /** What a JWT's `iss` must be, when set (`JWT_ISSUER`). */
  issuer?: string;
  /** Origins allowed cross-origin HTTP (`CORS_ORIGINS`, comma-separated). */
  corsOrigins: string[];
  /** A JWKS is fetched again for an unknown key at most this often, in ms. */
  jwksCooldownMs: number;
}

/** Every environment variable the server or `npm:pg` reads: the `--allow-env` list. */
export const ENV_VARS = [
  "DATABASE_URL",
  "DBNAME",
  "PGDATABASE",
  "PGUSER",
  "USER",
  "PGPASS",
  "PGPASSWORD",
  "PGPASSFILE",
  "HOME",
  "PGHOST",
  "PGPORT",
  "PGSSLMODE",
  "PGSSLROOTCERT",
  "PGSSLCERT",
  "PGSSLKEY",
  "PGSSLNEGOTIATION",
  "PGTARGETSESSIONATTRS",
  "PGLOADBALANCEHOSTS",
  "PGAPPNAME",
  "PGCONNECT_TIMEOUT",
  "PGCLIENT_ENCODING",
  "PGOPTIONS",
  "PGBINARY",
  "PGREPLICATION",
  "SERVERHOST",
  "SERVERPORT",
  "PORT",
  "SNAPSHOT_TTL_SECONDS",
  "SLOT_BUSY_TIMEOUT_SECONDS",
  "PUBLICATION_PREFIX",
  "FRAME_CHUNK_BYTES",
  "EXPORT_READERS",
  "SNAPSHOT_READERS",
  "AUTH",
  "ADMIN_TOKENS",
  "ADMIN_TOKEN",
  "JWT_SECRET",
  "JWKS_URL",
  "JWT_AUDIENCE",
  "JWT_ISSUER",
  "CORS_ORIGINS",
  "NODE_PG_FORCE_NATIVE",
  "LOG_FORMAT",
  "LOG_LEVEL",
  "METRICS",
  "METRICS_TOKEN",
  "STREAM_MAX_LAG_BYTES",
  "STREAM_MAX_IDLE_SECONDS",
  "WAL_GUARD_INTERVAL_SECONDS",
  "NATS_URL",
  "RELAY_MAX_AGE_SECONDS",
  "RELAY_MAX_BYTES",
  "RELAY_MAX_MESSAGES",
  "RELAY_REPLICAS",
  "RELAY_INSTANCE",
  "REPLICATION_TIMEOUT_SECONDS",
  "BACKFILL_CHUNK_ROWS",
] as const;

/** Reads one environment variable; `Deno.env.get` in production, a map in tests. */
export type EnvReader = (name: string) => string | undefined;

function nonEmpty(env: EnvReader, ...names: string[]): string | undefined {
  for (const name of names) {
    const value = env(name);
    if (value !== undefined && value !== "") return value;
  }
  return undefined;
}

function integer(
  env: EnvReader,
  names: string[],
  fallback: number,
  min: number,
  max: number,
): number {
  const name = names.find((n) => nonEmpty(env, n) !== undefined);
  if (name === undefined) return fallback;
  const text = env(name)!;
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || value < min || value > max) {
    throw new RangeError(
      `${name}=${JSON.stringify(text)} is invalid: expected an integer from ${min} to ${max}`,
    );
  }
  return value;
}

/**
 * The seed documented `PGPASS="''"` for "no password": shell quotes that
 * arrive literally through `docker run -e`. Treat them as an empty password.
 */
function password(env: EnvReader): string | undefined {
  const value = nonEmpty(env, "PGPASS", "PGPASSWORD");
  if (value === "''" || value === '""') return "";
  return value;
}

function list(env: EnvReader, ...names: string[]): string[] {
  return names.flatMap((name) => (env(name) ?? "").split(",")).map((s) => s.trim()).filter(Boolean);
}

/** The authentication settings; a `RangeError` naming the variable that is wrong. */
function loadAuth(env: EnvReader): AuthConfig {
  const adminTokens = list(env, "ADMIN_TOKENS", "ADMIN_TOKEN");
  if (adminTokens.some((t) => t.length < 16)) {
    throw new RangeError("ADMIN_TOKENS is invalid: each token must be at least 16 characters");
  }
  const jwtSecret = nonEmpty(env, "JWT_SECRET");
  if (jwtSecret !== undefined && new TextEncoder().encode(jwtSecret).length < 32) {
    throw new RangeError("JWT_SECRET is invalid: it must be at least 32 bytes (HS256)");
  }
  const jwksUrl = nonEmpty(env, "JWKS_URL");
  if (jwksUrl !== undefined && !/^https?:\/\//.test(jwksUrl)) {
    throw new RangeError("JWKS_URL is invalid: expected an http(s) URL");
  }
  const auth = nonEmpty(env, "AUTH");
  if (auth !== undefined && auth !== "none") {
    throw new RangeError(`AUTH=${JSON.stringify(auth)} is invalid: the only value is "none"`);
  }
  const corsOrigins = list(env, "CORS_ORIGINS");
  for (const origin of corsOrigins) {
    if (URL.parse(origin)?.origin !== origin) {
      throw new RangeError(
        `CORS_ORIGINS is invalid: ${
          JSON.stringify(origin)
        } is not an origin (scheme://host[:port])`,
      );
    }
  }
  const configured = adminTokens.length > 0 || jwtSecret !== undefined || jwksUrl !== undefined;
  return {
    mode: auth === "none" ? "none" : configured ? "on" : "protected",
    adminTokens,
    jwtSecret,
    jwksUrl,
    audience: nonEmpty(env, "JWT_AUDIENCE") ?? "pgdeltastream",
    issuer: nonEmpty(env, "JWT_ISSUER"),
    corsOrigins,
    jwksCooldownMs: 30_000,
  };
}

/** `name`'s value if it is one of `choices`, `fallback` when unset; a `RangeError` otherwise. */
function choice<T extends string>(
  env: EnvReader,
  name: string,
  choices: readonly T[],
  fallback: T,
): T {
  const value = nonEmpty(env, name);
  if (value === undefined) return fallback;
  if (!(choices as readonly string[]).includes(value)) {
    throw new RangeError(
      `${name}=${JSON.stringify(value)} is invalid: expected one of ${choices.join(", ")}`,
    );
  }
  return value as T;
}

/** The metrics settings. */
function loadMetrics(env: EnvReader): Config["metrics"] {
  const token = nonEmpty(env, "METRICS_TOKEN");
  if (token !== undefined && token.length < 16) {
    throw new RangeError("METRICS_TOKEN is invalid: it must be at least 16 characters");
  }
  return {
    enabled: choice(env, "METRICS", ["on", "off"], "on") === "on",
    token,
    historyIntervalMs: 5000,
  };
}

/** Relay mode's settings, when `NATS_URL` is set. */
function loadRelay(env: EnvReader): RelayConfig | undefined {
  const servers = list(env, "NATS_URL");
  if (servers.length === 0) return undefined;
  for (const server of servers) {
    if (!/^(nats|tls):\/\/[^\s/]+$|^[^\s/:]+:\d+$/.test(server)) {
      throw new RangeError(
        `NATS_URL is invalid: ${JSON.stringify(server)} is not nats://host:port`,
      );
    }
  }
  const instance = nonEmpty(env, "RELAY_INSTANCE") ??
    [...crypto.getRandomValues(new Uint8Array(4))].map((b) => b.toString(16).padStart(2, "0"))
      .join("");
  if (!/^[A-Za-z0-9_-]{1,32}$/.test(instance)) {
    throw new RangeError("RELAY_INSTANCE is invalid: use 1 to 32 of A-Z, a-z, 0-9, _ and -");
  }
  return {
    servers,
    maxAgeSeconds: integer(env, ["RELAY_MAX_AGE_SECONDS"], 7 * 86400, 1, 10 * 365 * 86400),
    maxBytes: integer(env, ["RELAY_MAX_BYTES"], 2 ** 30, 1 << 20, Number.MAX_SAFE_INTEGER),
    maxMessages: integer(env, ["RELAY_MAX_MESSAGES"], 0, 0, Number.MAX_SAFE_INTEGER),
    replicas: integer(env, ["RELAY_REPLICAS"], 1, 1, 5),
    instance,
  };
}

/** Builds the configuration from the environment; throws a `RangeError` naming the bad variable. */
export function loadConfig(env: EnvReader): Config {
  const database = loadDatabase(env);
  const prefix = nonEmpty(env, "PUBLICATION_PREFIX") ?? "pgdeltastream";
  if (!/^[a-z_][a-z0-9_]{0,40}$/.test(prefix)) {
    throw new RangeError(
      `PUBLICATION_PREFIX=${
        JSON.stringify(prefix)
      } is invalid: use lower-case letters, digits and _`,
    );
  }
  return {
    database,
    hostname: nonEmpty(env, "SERVERHOST") ?? "127.0.0.1",
    port: integer(env, ["SERVERPORT", "PORT"], 12312, 0, 65535),
    snapshotTtlSeconds: integer(env, ["SNAPSHOT_TTL_SECONDS"], 3600, 1, 7 * 24 * 3600),
    slotBusyTimeoutSeconds: integer(env, ["SLOT_BUSY_TIMEOUT_SECONDS"], 10, 0, 600),
    publicationPrefix: prefix,
    frameChunkBytes: integer(env, ["FRAME_CHUNK_BYTES"], 1 << 20, 1024, 64 << 20),
    backfillChunkRows: integer(env, ["BACKFILL_CHUNK_ROWS"], 10_000, 100, 1_000_000),
    exportReaders: integer(env, ["EXPORT_READERS"], 2, 1, 16),
    snapshotReaders: integer(env, ["SNAPSHOT_READERS"], 8, 1, 64),
    snapshotReaderWaitMs: 10_000,
    auth: loadAuth(env),
    log: {
      format: choice(env, "LOG_FORMAT", ["text", "json"], "text"),
      level: choice(env, "LOG_LEVEL", LOG_LEVELS, "info"),
    },
    metrics: loadMetrics(env),
    streamLimits: {
      maxLagBytes: integer(env, ["STREAM_MAX_LAG_BYTES"], 8 * 2 ** 30, 0, Number.MAX_SAFE_INTEGER),
      maxIdleSeconds: integer(env, ["STREAM_MAX_IDLE_SECONDS"], 7 * 24 * 3600, 0, 10 * 365 * 86400),
    },
    walGuardIntervalMs: integer(env, ["WAL_GUARD_INTERVAL_SECONDS"], 10, 1, 3600) * 1000,
    relay: loadRelay(env),
    replicationTimeoutMs: integer(env, ["REPLICATION_TIMEOUT_SECONDS"], 60, 0, 3600) * 1000,
  };
}

/** A whole number of seconds from `text` (parameter `name`), at least `min`. */
function seconds(name: string, text: string, min: number): number {
  const value = Number(text);
  if (!/^\d+$/.test(text.trim())) {
    throw new RangeError(`${name}=${JSON.stringify(text)} is invalid: expected whole seconds`);
  }
  return value === 0 ? 0 : Math.max(min, value);
}

/**
 * The database settings, as libpq resolves them: each `DATABASE_URL`
 * parameter wins over its `PG*` variable (and the seed's names), which wins
 * over the default. A `RangeError` names what is wrong, never a password.
 */
function loadDatabase(env: EnvReader): DatabaseConfig {
  const url = nonEmpty(env, "DATABASE_URL");
  const uri = url === undefined ? {} : parseConnectionUri(url);
  const pick = (keyword: keyof typeof uri, ...names: string[]) =>
    uri[keyword] !== undefined && uri[keyword] !== "" ? uri[keyword] : nonEmpty(env, ...names);
  const user = pick("user", "PGUSER", "USER") ?? "postgres";
  const hostNames = (pick("host", "PGHOST") ?? "localhost").split(",").map((h) => h || "localhost");
  const portTexts = (pick("port", "PGPORT") ?? "5432").split(",").map((p) => p || "5432");
  const portsFrom = uri.port !== undefined ? "DATABASE_URL's port" : "PGPORT";
  if (portTexts.length !== 1 && portTexts.length !== hostNames.length) {
    throw new RangeError(
      `${portsFrom} is invalid: give one port, or one for each of the ${hostNames.length} hosts`,
    );
  }
  const hosts = hostNames.map((host, i) => {
    const text = portTexts[portTexts.length === 1 ? 0 : i];
    const port = Number(text);
    if (!/^\d+$/.test(text) || port < 1 || port > 65535) {
      throw new RangeError(`${portsFrom} is invalid: expected 1 to 65535`);
    }
    return { host, port };
  });
  const attrs = pick("target_session_attrs", "PGTARGETSESSIONATTRS") ??
    // The server needs a primary: given several hosts, one that takes writes is what to look for.
    (hosts.length > 1 ? "read-write" : "any");
  if (!(SESSION_ATTRS as readonly string[]).includes(attrs)) {
    throw new RangeError(
      `target_session_attrs=${JSON.stringify(attrs)} is invalid: expected one of ${
        SESSION_ATTRS.join(", ")
      }`,
    );
  }
  const balance = pick("load_balance_hosts", "PGLOADBALANCEHOSTS") ?? "disable";
  if (balance !== "disable" && balance !== "random") {
    throw new RangeError("load_balance_hosts is invalid: expected disable or random");
  }
  const sslmode = pick("sslmode", "PGSSLMODE");
  if (sslmode !== undefined && !(SSL_MODES as readonly string[]).includes(sslmode)) {
    throw new RangeError(
      `sslmode=${JSON.stringify(sslmode)} is invalid: expected one of ${SSL_MODES.join(", ")}`,
    );
  }
  const sslrootcert = pick("sslrootcert", "PGSSLROOTCERT");
  // As libpq 16+: the system's roots mean the server's name is checked too.
  if (sslrootcert === "system" && sslmode !== undefined && sslmode !== "verify-full") {
    throw new RangeError(
      `sslrootcert=system needs sslmode=verify-full (or no sslmode), not ${sslmode}`,
    );
  }
  const negotiation = pick("sslnegotiation", "PGSSLNEGOTIATION") ?? "postgres";
  if (negotiation !== "postgres" && negotiation !== "direct") {
    throw new RangeError(
      `sslnegotiation=${JSON.stringify(negotiation)} is invalid: expected postgres or direct`,
    );
  }
  const effectiveMode: SslMode = (sslmode as SslMode | undefined) ??
    (sslrootcert === "system" ? "verify-full" : "prefer");
  if (negotiation === "direct" && SSL_MODES.indexOf(effectiveMode) < SSL_MODES.indexOf("require")) {
    throw new RangeError("sslnegotiation=direct needs sslmode=require or stricter");
  }
  const keepalives = uri.keepalives ?? "1";
  if (keepalives !== "0" && keepalives !== "1") {
    throw new RangeError("keepalives is invalid: expected 0 or 1");
  }
  const home = nonEmpty(env, "HOME");
  const timeout = pick("connect_timeout", "PGCONNECT_TIMEOUT");
  return {
    host: hosts[0].host,
    port: hosts[0].port,
    ...(hosts.length > 1 ? { hosts } : {}),
    targetSessionAttrs: attrs as SessionAttrs,
    loadBalanceHosts: balance === "random",
    user,
    password: uri.password ?? password(env),
    database: pick("dbname", "DBNAME", "PGDATABASE") ?? user,
    options: [nonEmpty(env, "PGOPTIONS"), uri.options].filter(Boolean).join(" ") || undefined,
    application_name: "pgdeltastream",
    sslmode: effectiveMode,
    sslrootcert,
    sslcert: pick("sslcert", "PGSSLCERT"),
    sslkey: pick("sslkey", "PGSSLKEY"),
    sslnegotiation: negotiation,
    passfile: pick("passfile", "PGPASSFILE") ??
      (home === undefined ? undefined : `${home}/.pgpass`),
    // libpq waits for ever by default; a server that must come up again after an outage should not.
    connectTimeoutSeconds: timeout === undefined ? 30 : seconds("connect_timeout", timeout, 2),
    keepalives: keepalives === "1",
    keepalivesIdleSeconds: uri.keepalives_idle === undefined
      ? 60
      : seconds("keepalives_idle", uri.keepalives_idle, 1),
  };
}

/** `host:port` of one host (a socket as its path). */
export function describeHost({ host, port }: DatabaseHost): string {
  return host.startsWith("/")
    ? `${host}/.s.PGSQL.${port}`
    : `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/** `host:port/database` for messages (every host, a socket as its path); never the password. */
export function describeDatabase(db: DatabaseConfig): string {
  return `${(db.hosts ?? [db]).map(describeHost).join(",")}/${db.database}`;
}
