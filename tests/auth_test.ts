import assert from "node:assert/strict";
import { exportJWK, generateKeyPair, type JWK, SignJWT } from "jose";
import type { Config } from "../src/config.ts";
import { CloseCode } from "../src/protocol.ts";
import {
  ServerProcess,
  sql,
  startApi,
  startPostgres,
  StreamClient,
  WEBSOCKET_HANDSHAKE,
} from "./support/harness.ts";

const ADMIN_TOKEN = "admin-token-" + crypto.randomUUID();
const JWT_SECRET = "jwt-secret-" + crypto.randomUUID() + crypto.randomUUID();
const ISSUER = "https://issuer.test";
const AUDIENCE = "pgdeltastream";
const encoder = new TextEncoder();

/** A JWKS served from this test on loopback, counting how often it is fetched. */
class JwksServer implements AsyncDisposable {
  keys: JWK[] = [];
  fetches = 0;
  readonly #server: Deno.HttpServer<Deno.NetAddr>;

  constructor() {
    this.#server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, () => {
      this.fetches++;
      return Response.json({ keys: this.keys });
    });
  }

  get url(): string {
    return `http://127.0.0.1:${this.#server.addr.port}/jwks.json`;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.#server.shutdown();
  }
}

type Claims = Record<string, unknown>;

/** An HS256 JWT with `claims` (defaults: the right audience and issuer, valid an hour). */
function hs256(claims: Claims, secret = JWT_SECRET): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ aud: AUDIENCE, iss: ISSUER, exp: now + 3600, ...claims })
    .setProtectedHeader({ alg: "HS256" })
    .sign(encoder.encode(secret));
}

const base64url = (data: string | Uint8Array) =>
  btoa(typeof data === "string" ? data : String.fromCharCode(...data))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

Deno.test("authentication: every endpoint against every kind of credential", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(
    db,
    "CREATE TABLE alpha_t(id int primary key, v text); CREATE TABLE beta_t(id int primary key)",
  );
  await using jwks = new JwksServer();
  const rsa = await generateKeyPair("RS256", { extractable: true });
  const rsaJwk = { ...(await exportJWK(rsa.publicKey)), kid: "rsa-1", alg: "RS256", use: "sig" };
  jwks.keys = [rsaJwk];
  const rs256 = (claims: Claims) => {
    const now = Math.floor(Date.now() / 1000);
    return new SignJWT({ aud: AUDIENCE, iss: ISSUER, exp: now + 3600, ...claims })
      .setProtectedHeader({ alg: "RS256", kid: "rsa-1" })
      .sign(rsa.privateKey);
  };
  await using server = await ServerProcess.spawn(db, {
    ADMIN_TOKENS: `other-admin-token-0001,${ADMIN_TOKEN}`,
    JWT_SECRET,
    JWKS_URL: jwks.url,
    JWT_ISSUER: ISSUER,
    SLOT_BUSY_TIMEOUT_SECONDS: "5",
  });
  const asAdmin = { authorization: `Bearer ${ADMIN_TOKEN}` };
  for (const name of ["alpha", "beta", "doomed", "resettable"]) {
    const response = await fetch(new URL("/v2/streams", server.url), {
      method: "POST",
      headers: { ...asAdmin, "content-type": "application/json" },
      body: JSON.stringify({ name, tables: [name === "beta" ? "beta_t" : "alpha_t"] }),
    });
    assert.equal(response.status, 201, await response.text());
  }

  const now = Math.floor(Date.now() / 1000);
  const valid = await hs256({ streams: ["alpha"] });
  const [header, payload, signature] = valid.split(".");
  const tampered = `${header}.${
    base64url(
      JSON.stringify({
        ...JSON.parse(atob(payload.replace(/-/g, "+").replace(/_/g, "/"))),
        streams: ["*"],
      }),
    )
  }.${signature}`;
  // The RS256 public key, as PEM text, used as an HS256 secret: the algorithm-confusion forgery.
  const spki = new Uint8Array(await crypto.subtle.exportKey("spki", rsa.publicKey as CryptoKey));
  const pem = `-----BEGIN PUBLIC KEY-----\n${
    btoa(String.fromCharCode(...spki))
  }\n-----END PUBLIC KEY-----\n`;
  const confused = await new SignJWT({
    aud: AUDIENCE,
    iss: ISSUER,
    exp: now + 3600,
    streams: ["*"],
    admin: true,
  })
    .setProtectedHeader({ alg: "HS256", kid: "rsa-1" })
    .sign(encoder.encode(pem));

  /** Each credential: its header value (none: no header), and what it proves. */
  const credentials: [
    string,
    string | undefined,
    "invalid" | "alpha" | "beta" | "admin",
    RegExp?,
  ][] = [
    ["no credential", undefined, "invalid", /Missing credential/],
    ["garbage", "Bearer garbage", "invalid", /Unknown token/],
    ["not a bearer", "Basic dXNlcjpwYXNz", "invalid", /must be "Bearer <token>"/],
    [
      "expired",
      `Bearer ${await hs256({ streams: ["alpha"], exp: now - 60 })}`,
      "invalid",
      /expired/,
    ],
    [
      "not yet valid",
      `Bearer ${await hs256({ streams: ["alpha"], nbf: now + 3600 })}`,
      "invalid",
      /not valid yet/,
    ],
    [
      "wrong audience",
      `Bearer ${await hs256({ streams: ["alpha"], aud: "someone-else" })}`,
      "invalid",
      /audience/,
    ],
    [
      "wrong issuer",
      `Bearer ${await hs256({ streams: ["alpha"], iss: "https://evil.test" })}`,
      "invalid",
      /issuer/,
    ],
    [
      "no expiry",
      `Bearer ${await new SignJWT({ aud: AUDIENCE, iss: ISSUER, streams: ["alpha"] })
        .setProtectedHeader({ alg: "HS256" }).sign(encoder.encode(JWT_SECRET))}`,
      "invalid",
      /exp is required|expiry/,
    ],
    [
      "alg none",
      `Bearer ${base64url(JSON.stringify({ alg: "none", typ: "JWT" }))}.${
        base64url(JSON.stringify({ aud: AUDIENCE, iss: ISSUER, exp: now + 3600, admin: true }))
      }.`,
      "invalid",
      /algorithm none|not accepted/,
    ],
    [
      "HS256 signed with the JWKS public key",
      `Bearer ${confused}`,
      "invalid",
      /signature is invalid/,
    ],
    [
      "HS256 with another secret",
      `Bearer ${await hs256({ streams: ["alpha"] }, "x".repeat(40))}`,
      "invalid",
      /signature is invalid/,
    ],
    ["tampered payload", `Bearer ${tampered}`, "invalid", /signature is invalid/],
    [
      "expired (RS256, JWKS)",
      `Bearer ${await rs256({ streams: ["alpha"], exp: now - 60 })}`,
      "invalid",
      /expired/,
    ],
    [
      "wrong audience (RS256, JWKS)",
      `Bearer ${await rs256({ streams: ["alpha"], aud: "someone-else" })}`,
      "invalid",
      /audience/,
    ],
    ["consumer of another stream", `Bearer ${await hs256({ streams: ["beta"] })}`, "beta"],
    ["consumer of every stream (*)", `Bearer ${await hs256({ streams: ["*"] })}`, "alpha"],
    ["consumer of this stream (HS256)", `Bearer ${valid}`, "alpha"],
    [
      "consumer of this stream (RS256, JWKS)",
      `Bearer ${await rs256({ streams: ["alpha"] })}`,
      "alpha",
    ],
    ["admin token", `Bearer ${ADMIN_TOKEN}`, "admin"],
    ["admin JWT", `Bearer ${await hs256({ admin: true })}`, "admin"],
  ];

  const ws = WEBSOCKET_HANDSHAKE;
  /** Each endpoint: method, path, body, headers, and who may call it. */
  const endpoints: [
    string,
    string,
    unknown,
    Record<string, string>,
    "public" | "signed-in" | "admin" | "alpha",
  ][] = [
    ["GET", "/healthz", undefined, {}, "public"],
    ["GET", "/", undefined, {}, "public"],
    ["GET", "/metrics", undefined, {}, "admin"],
    ["GET", "/v2/status", undefined, {}, "admin"],
    ["GET", "/v2/events", undefined, {}, "admin"],
    ["GET", "/v2/metrics/history", undefined, {}, "admin"],
    ["GET", "/v1/init", undefined, {}, "admin"],
    ["POST", "/v1/init", undefined, {}, "admin"],
    ["POST", "/v1/snapshot/data", { slotName: "delta_nosuch1", table: "alpha_t" }, {}, "admin"],
    ["POST", "/v1/snapshot/export", { slotName: "delta_nosuch1", table: "alpha_t" }, {}, "admin"],
    ["GET", "/v1/lr/stream?slotName=delta_nosuch1", undefined, ws, "admin"],
    ["GET", "/v2/streams", undefined, {}, "signed-in"],
    ["POST", "/v2/streams", { name: "made", tables: ["alpha_t"] }, {}, "admin"],
    ["GET", "/v2/streams/alpha", undefined, {}, "alpha"],
    ["PATCH", "/v2/streams/alpha", { limits: {} }, {}, "admin"],
    ["POST", "/v2/streams/alpha/tokens", {}, {}, "admin"],
    ["POST", "/v2/streams/alpha/snapshot", { table: "alpha_t" }, {}, "alpha"],
    ["POST", "/v2/streams/alpha/snapshot/export", { table: "alpha_t" }, {}, "alpha"],
    ["GET", "/v2/streams/alpha/changes", undefined, ws, "alpha"],
    ["GET", "/v2/streams/alpha/tail", undefined, ws, "alpha"],
    ["DELETE", "/v2/streams/alpha/snapshot", undefined, {}, "alpha"],
    ["POST", "/v2/streams/resettable/reset", undefined, {}, "admin"],
    ["GET", "/assets/viewer.js", undefined, {}, "public"],
    ["GET", "/assets/pgdeltastream.js", undefined, {}, "public"],
    ["DELETE", "/v2/streams/doomed", undefined, {}, "admin"],
  ];
  const bodies: string[] = [];
  const outcomes: string[] = [];
  /** Tokens sent in `access_token` query parameters: they must not reach the log either. */
  const queryTokens: string[] = [];

  for (const [label, authorization, proves, message] of credentials) {
    await t.step(label, async () => {
      for (const [method, path, body, headers, who] of endpoints) {
        const allowed = who === "public" || proves === "admin" ||
          (proves !== "invalid" &&
            (who === "signed-in" || (who === "alpha" && proves === "alpha")));
        // Calls that succeed and change state are made once, by the admin token, below.
        if (
          allowed && proves !== "invalid" &&
          /DELETE|POST \/v2\/streams$|\/v1\/init|tokens|reset/.test(`${method} ${path}`)
        ) {
          if (label !== "admin token") continue;
        }
        const response = await fetch(new URL(path, server.url), {
          method,
          headers: {
            ...headers,
            ...(authorization ? { authorization } : {}),
            ...(body !== undefined ? { "content-type": "application/json" } : {}),
          },
          body: body === undefined ? undefined : JSON.stringify(body),
        });
        const text = await response.text();
        bodies.push(text);
        const expected = allowed ? "allowed" : proves === "invalid" ? "401" : "403";
        const got = response.status === 401 ? "401" : response.status === 403 ? "403" : "allowed";
        assert.equal(got, expected, `${label}: ${method} ${path} → ${response.status} ${text}`);
        assert.ok(
          response.status < 500,
          `${label}: ${method} ${path} → ${response.status} ${text}`,
        );
        if (got === "401") {
          assert.match(
            response.headers.get("www-authenticate") ?? "",
            /^Bearer realm="pgdeltastream"/,
          );
          if (message) assert.match(JSON.parse(text).error, message, `${label}: ${path}`);
        }
        if (got !== "allowed") assert.equal(typeof JSON.parse(text).error, "string");
      }
      outcomes.push(
        `${label}: ${
          proves === "invalid"
            ? "401"
            : proves === "admin"
            ? "all allowed"
            : `reads ${proves}, 403 elsewhere`
        }`,
      );
    });
  }

  await t.step(
    "a consumer's open stream and tail close with 4401 when its token expires",
    async () => {
      const shortLived = await hs256({
        streams: ["alpha"],
        exp: Math.floor(Date.now() / 1000) + 2,
      });
      const fresh = await hs256({ streams: ["alpha"] });
      queryTokens.push(shortLived, fresh);
      await using client = await StreamClient.connect(
        server.url,
        `/v2/streams/alpha/changes?access_token=${shortLived}`,
      );
      await using tail = await StreamClient.connect(
        server.url,
        `/v2/streams/alpha/tail?access_token=${shortLived}`,
      );
      const closed = await client.closedWithin();
      assert.equal(closed.code, CloseCode.TokenExpired);
      assert.match(closed.reason, /token expired/);
      const tailClosed = await tail.closedWithin();
      assert.equal(tailClosed.code, CloseCode.TokenExpired, "the tail closes too");
      // A fresh token resumes.
      await using again = await StreamClient.connect(
        server.url,
        `/v2/streams/alpha/changes?access_token=${fresh}`,
      );
      await sql(db, "INSERT INTO alpha_t VALUES (1, 'after expiry')");
      assert.ok((await again.nextV2()).change.some((c) => c.kind === "insert"));
    },
  );

  await t.step("a minted token reads its one stream, and nothing else", async () => {
    const minted = await fetch(new URL("/v2/streams/alpha/tokens", server.url), {
      method: "POST",
      headers: { ...asAdmin, "content-type": "application/json" },
      body: JSON.stringify({ ttlSeconds: 60 }),
    });
    assert.equal(minted.status, 201);
    const { token, expiresAt } = await minted.json();
    assert.ok(Math.abs(Date.parse(expiresAt) - Date.now() - 60_000) < 5_000);
    const auth = { authorization: `Bearer ${token}` };
    const own = await fetch(new URL("/v2/streams/alpha", server.url), { headers: auth });
    assert.equal(own.status, 200);
    await own.body?.cancel();
    const other = await fetch(new URL("/v2/streams/beta", server.url), { headers: auth });
    assert.equal(other.status, 403);
    await other.body?.cancel();
    const listed = await fetch(new URL("/v2/streams", server.url), { headers: auth });
    assert.deepEqual((await listed.json()).streams.map((s: { name: string }) => s.name), ["alpha"]);
  });

  await t.step("minting needs JWT_SECRET: a server with only a JWKS says so (409)", async () => {
    await using jwksOnly = await ServerProcess.spawn(db, {
      ADMIN_TOKENS: ADMIN_TOKEN,
      JWKS_URL: jwks.url,
    });
    const minted = await fetch(new URL("/v2/streams/alpha/tokens", jwksOnly.url), {
      method: "POST",
      headers: { ...asAdmin, "content-type": "application/json" },
      body: "{}",
    });
    assert.equal(minted.status, 409);
    assert.match((await minted.json()).error, /no JWT_SECRET/);
  });

  await t.step("no secret, token or credential appears in any error body or log line", async () => {
    await server.kill("SIGTERM");
    const log = await server.output;
    const secrets = [
      ADMIN_TOKEN,
      JWT_SECRET,
      valid,
      signature,
      confused.split(".")[2],
      ...queryTokens.map((token) => token.split(".")[2]),
    ];
    for (const secret of secrets) {
      assert.ok(!bodies.some((b) => b.includes(secret)), "a secret in a response body");
      assert.ok(!log.includes(secret), "a secret in the server's log");
    }
  });
  console.log(outcomes.join("\n"));
});

/** A server that trusts only the JWTs of `jwks`, refetching it at most every `cooldownMs`. */
function jwksOnly(jwks: JwksServer, cooldownMs: number): Partial<Config> {
  return {
    auth: {
      mode: "on",
      adminTokens: [],
      jwksUrl: jwks.url,
      audience: AUDIENCE,
      corsOrigins: [],
      jwksCooldownMs: cooldownMs,
    },
  };
}

Deno.test("JWKS keys are cached: a known kid never refetches, a new one is fetched once (ES256, EdDSA)", async () => {
  await using postgres = await startPostgres();
  await using jwks = new JwksServer();
  const first = await generateKeyPair("ES256", { extractable: true });
  jwks.keys = [{ ...(await exportJWK(first.publicKey)), kid: "k1", alg: "ES256" }];
  await using api = await startApi(postgres.database, jwksOnly(jwks, 0));
  const sign = (key: CryptoKey, kid: string) =>
    new SignJWT({ aud: AUDIENCE, exp: Math.floor(Date.now() / 1000) + 600, streams: ["*"] })
      .setProtectedHeader({ alg: "ES256", kid })
      .sign(key);
  const list = async (token: string) => {
    const response = await fetch(new URL("/v2/streams", api.url), {
      headers: { authorization: `Bearer ${token}` },
    });
    await response.body?.cancel();
    return response.status;
  };
  const k1 = await sign(first.privateKey as CryptoKey, "k1");
  for (let i = 0; i < 5; i++) assert.equal(await list(k1), 200);
  assert.equal(jwks.fetches, 1, "a known kid is served from the cache");
  // Rotation: a second key appears; a token with its kid makes the JWKS be fetched once.
  const second = await generateKeyPair("ES256", { extractable: true });
  jwks.keys.push({ ...(await exportJWK(second.publicKey)), kid: "k2", alg: "ES256" });
  const k2 = await sign(second.privateKey as CryptoKey, "k2");
  for (let i = 0; i < 5; i++) assert.equal(await list(k2), 200);
  assert.equal(await list(k1), 200);
  assert.equal(jwks.fetches, 2, "the new kid was fetched once, then cached");
  // EdDSA (Ed25519) keys are served the same way.
  const edwards = await generateKeyPair("EdDSA", { crv: "Ed25519", extractable: true });
  jwks.keys.push({ ...(await exportJWK(edwards.publicKey)), kid: "k3", alg: "EdDSA" });
  const k3 = await new SignJWT({
    aud: AUDIENCE,
    exp: Math.floor(Date.now() / 1000) + 600,
    streams: ["*"],
  })
    .setProtectedHeader({ alg: "EdDSA", kid: "k3" })
    .sign(edwards.privateKey);
  assert.equal(await list(k3), 200);
  assert.equal(jwks.fetches, 3);
});

Deno.test("unknown kids wait out the JWKS cool-down: five of them cost one fetch", async () => {
  await using postgres = await startPostgres();
  await using jwks = new JwksServer();
  const known = await generateKeyPair("ES256", { extractable: true });
  jwks.keys = [{ ...(await exportJWK(known.publicKey)), kid: "known", alg: "ES256" }];
  await using api = await startApi(postgres.database, jwksOnly(jwks, 30_000));
  const stranger = await generateKeyPair("ES256");
  for (let i = 0; i < 5; i++) {
    const token = await new SignJWT({ aud: AUDIENCE, exp: Math.floor(Date.now() / 1000) + 600 })
      .setProtectedHeader({ alg: "ES256", kid: `unknown-${i}` })
      .sign(stranger.privateKey);
    const response = await fetch(new URL("/v2/streams", api.url), {
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(response.status, 401);
    await response.body?.cancel();
  }
  assert.equal(jwks.fetches, 1, "one fetch, then the cool-down holds further ones off");
});

Deno.test("protected mode serves this machine only, and origins are checked in every mode", async (t) => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  await sql(db, "CREATE TABLE t(id int primary key)");
  const address = Deno.networkInterfaces().find((i) =>
    i.family === "IPv4" && !i.address.startsWith("127.")
  )?.address;
  await using open = await ServerProcess.spawn(db, { SERVERHOST: "0.0.0.0" });
  const port = open.url.port;

  await t.step("a client on another address gets 403 naming the variables to set", async () => {
    assert.ok(address, "this machine has an address other than loopback to connect from");
    const response = await fetch(`http://${address}:${port}/v2/streams`);
    assert.equal(response.status, 403);
    assert.match((await response.json()).error, /ADMIN_TOKENS, JWT_SECRET or JWKS_URL/);
    const health = await fetch(`http://${address}:${port}/healthz`);
    assert.equal(health.status, 403, "protected mode serves no one else at all");
    await health.body?.cancel();
  });

  await t.step(
    "a loopback client whose Host names another machine (DNS rebinding) gets 403",
    async () => {
      // fetch() will not send another Host than the URL's: write the request by hand.
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: Number(port) });
      await conn.write(
        new TextEncoder().encode(
          `GET /v2/streams HTTP/1.1\r\nHost: rebound.example:${port}\r\nConnection: close\r\n\r\n`,
        ),
      );
      const answer = new TextDecoder().decode(await new Response(conn.readable).arrayBuffer());
      assert.match(answer, /^HTTP\/1\.1 403/);
      assert.match(answer, /serves clients on its own machine only/);
    },
  );

  await t.step(
    "a loopback client is served, v1 included, as the seed's clients expect",
    async () => {
      const init = await fetch(`http://127.0.0.1:${port}/v1/init`);
      assert.equal(init.status, 200);
      await init.body?.cancel();
    },
  );

  await t.step(
    "a page of another site cannot drop the slot, nor open a stream, even in protected mode",
    async () => {
      const evil = { origin: "https://evil.example" };
      const init = await fetch(`http://127.0.0.1:${port}/v1/init`, { headers: evil });
      assert.equal(init.status, 403);
      assert.match((await init.json()).error, /Cross-site request refused.*CORS_ORIGINS/);
      const create = await fetch(`http://127.0.0.1:${port}/v2/streams`, {
        method: "POST",
        headers: { ...evil, "content-type": "text/plain" },
        body: JSON.stringify({ name: "csrf", tables: ["t"] }),
      });
      assert.equal(create.status, 403);
      await create.body?.cancel();
      const upgrade = await fetch(`http://127.0.0.1:${port}/v1/lr/stream?slotName=delta_x1`, {
        headers: {
          ...evil,
          ...WEBSOCKET_HANDSHAKE,
        },
      });
      assert.equal(upgrade.status, 403);
      await upgrade.body?.cancel();
      for (const path of ["/v2/streams/same-origin/changes", "/v2/streams/same-origin/tail"]) {
        const v2 = await fetch(`http://127.0.0.1:${port}${path}`, {
          headers: { ...evil, ...WEBSOCKET_HANDSHAKE },
        });
        assert.equal(v2.status, 403, `${path} refuses a foreign page's upgrade`);
        assert.match((await v2.json()).error, /Cross-site request refused/);
      }
      const read = await fetch(`http://127.0.0.1:${port}/v2/streams`, { headers: evil });
      assert.equal(read.status, 200, "a read is answered ...");
      assert.equal(
        read.headers.get("access-control-allow-origin"),
        null,
        "... but not readable by that page",
      );
      await read.body?.cancel();
      const preflight = await fetch(`http://127.0.0.1:${port}/v2/streams`, {
        method: "OPTIONS",
        headers: { ...evil, "access-control-request-method": "POST" },
      });
      assert.equal(preflight.status, 403);
      await preflight.body?.cancel();
      const same = await fetch(`http://127.0.0.1:${port}/v2/streams`, {
        method: "POST",
        headers: { origin: `http://127.0.0.1:${port}`, "content-type": "application/json" },
        body: JSON.stringify({ name: "same-origin", tables: ["t"] }),
      });
      assert.equal(same.status, 201, "the server's own pages may");
      await same.body?.cancel();
    },
  );

  await t.step("AUTH=none serves every address, and still refuses foreign pages", async () => {
    assert.ok(address, "this machine has an address other than loopback to connect from");
    await using none = await ServerProcess.spawn(db, { SERVERHOST: "0.0.0.0", AUTH: "none" });
    const base = `http://${address}:${none.url.port}`;
    const listed = await fetch(`${base}/v2/streams`);
    assert.equal(listed.status, 200, "a client on another address is served");
    await listed.body?.cancel();
    const created = await fetch(`${base}/v2/streams`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "open-net", tables: ["t"] }),
    });
    assert.equal(created.status, 201, "and may do everything");
    await created.body?.cancel();
    const evil = { origin: "https://evil.example" };
    const drop = await fetch(`${base}/v2/streams/open-net`, { method: "DELETE", headers: evil });
    assert.equal(drop.status, 403, "a foreign page may not, even with AUTH=none");
    await drop.body?.cancel();
    const upgrade = await fetch(`${base}/v2/streams/open-net/changes`, {
      headers: { ...evil, ...WEBSOCKET_HANDSHAKE },
    });
    assert.equal(upgrade.status, 403);
    await upgrade.body?.cancel();
    await none.kill("SIGTERM");
    assert.match(await none.output, /authentication: none \(AUTH=none\)/);
  });

  await t.step("start-up says protected mode is in force", async () => {
    await open.kill("SIGTERM");
    assert.match(await open.output, /authentication: protected mode/);
  });

  await t.step("CORS_ORIGINS lets a listed origin call, with preflight and headers", async () => {
    await using api = await ServerProcess.spawn(db, {
      ADMIN_TOKENS: ADMIN_TOKEN,
      CORS_ORIGINS: "https://app.example",
    });
    const preflight = await fetch(new URL("/v2/streams", api.url), {
      method: "OPTIONS",
      headers: { origin: "https://app.example", "access-control-request-method": "POST" },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers.get("access-control-allow-origin"), "https://app.example");
    assert.match(preflight.headers.get("access-control-allow-headers") ?? "", /authorization/);
    await preflight.body?.cancel();
    const listed = await fetch(new URL("/v2/streams", api.url), {
      headers: { origin: "https://app.example", authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    assert.equal(listed.status, 200);
    assert.equal(listed.headers.get("access-control-allow-origin"), "https://app.example");
    await listed.body?.cancel();
    const denied = await fetch(new URL("/v2/streams", api.url), {
      method: "POST",
      headers: { origin: "https://other.example", authorization: `Bearer ${ADMIN_TOKEN}` },
      body: "{}",
    });
    assert.equal(
      denied.status,
      403,
      "an admin's credential does not make a foreign page's call safe",
    );
    await denied.body?.cancel();
    await api.kill("SIGTERM");
    assert.match(await api.output, /authentication: on/);
  });
});
