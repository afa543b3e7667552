/**
 * Checking credentials: admin bearer tokens (compared in constant time) and
 * consumer JWTs, verified with `npm:jose`: HS256 with `JWT_SECRET`, and
 * RS256, ES256 or EdDSA against `JWKS_URL`, whose keys are cached and fetched
 * again only for a key id not seen (at most once per cool-down). `exp` is
 * required; `nbf`, `aud` and (when configured) `iss` are checked; `none` and
 * any algorithm not configured are refused, so an HS256 token made with a
 * public key of the JWKS (algorithm confusion) fails: HS256 is only ever
 * checked against the secret.
 * @module
 */

import {
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors,
  type JWTPayload,
  jwtVerify,
  SignJWT,
} from "jose";
import { createHash } from "node:crypto";
import type { AuthConfig } from "../config.ts";
import { CONSUMER_ID } from "../protocol.ts";
import { UnauthorizedError } from "../errors.ts";
import type { Principal } from "./principal.ts";

/** The asymmetric algorithms accepted from the JWKS. */
const JWKS_ALGORITHMS = ["RS256", "ES256", "EdDSA"];

const encoder = new TextEncoder();

function digest(text: string): Uint8Array {
  // node:crypto's hash is synchronous: ~3 µs a token, where crypto.subtle's promise costs ~45 µs.
  return new Uint8Array(createHash("sha256").update(text).digest());
}

/** Whether two digests are equal, looking at every byte whatever they hold. */
function sameDigest(a: Uint8Array, b: Uint8Array): boolean {
  let difference = a.length ^ b.length;
  for (let i = 0; i < a.length && i < b.length; i++) difference |= a[i] ^ b[i];
  return difference === 0;
}

/** Why jose refused a JWT, for the client: never the token itself. */
function reason(error: unknown): string {
  if (error instanceof errors.JWTExpired) return "Token expired";
  if (error instanceof errors.JWTClaimValidationFailed) {
    switch (error.claim) {
      case "aud":
        return "Token audience is wrong: it must include the configured JWT_AUDIENCE";
      case "iss":
        return "Token issuer is wrong: it must be the configured JWT_ISSUER";
      case "nbf":
        return "Token is not valid yet (nbf)";
      case "exp":
        return "Token has no expiry: exp is required";
    }
    return `Token claim ${error.claim} is invalid`;
  }
  if (error instanceof errors.JWSSignatureVerificationFailed) return "Token signature is invalid";
  if (error instanceof errors.JOSEAlgNotAllowed) return "Token algorithm is not accepted";
  if (error instanceof errors.JWKSNoMatchingKey) return "Token key id is not in the JWKS";
  if (error instanceof errors.JWKSTimeout || error instanceof errors.JWKSInvalid) {
    return "Token cannot be checked now: the JWKS is unavailable";
  }
  return "Token is malformed";
}

/** Verified JWTs kept, at most, and for at most how long (never past their own expiry). */
const CACHE_ENTRIES = 10_000;
const CACHE_MS = 60_000;

/** Checks credentials against the configuration; see the module's documentation. */
export class Authenticator {
  readonly #config: AuthConfig;
  readonly #adminDigests: Uint8Array[];
  readonly #scraperDigest: Uint8Array | undefined;
  readonly #secret: Uint8Array | undefined;
  /** The secret imported once (jose imports a raw secret again on every call). */
  readonly #hmacKey: Promise<CryptoKey> | undefined;
  readonly #jwks: ReturnType<typeof createRemoteJWKSet> | undefined;
  /**
   * JWTs verified lately, by their text: a client sends the same token with
   * every request. Kept until the token's expiry or a minute, whichever
   * comes first, oldest dropped first beyond {@link CACHE_ENTRIES}.
   */
  readonly #verified = new Map<string, { principal: Principal; until: number }>();

  /** Uses `config`'s tokens, secret and JWKS, and `metricsToken` for scrapers. */
  constructor(config: AuthConfig, metricsToken?: string) {
    this.#config = config;
    this.#adminDigests = config.adminTokens.map(digest);
    this.#scraperDigest = metricsToken === undefined ? undefined : digest(metricsToken);
    this.#secret = config.jwtSecret === undefined ? undefined : encoder.encode(config.jwtSecret);
    this.#hmacKey = this.#secret === undefined ? undefined : crypto.subtle.importKey(
      "raw",
      this.#secret as Uint8Array<ArrayBuffer>,
      { name: "HMAC", hash: "SHA-256" },
      false,
      ["sign", "verify"],
    );
    this.#jwks = config.jwksUrl === undefined ? undefined : createRemoteJWKSet(
      new URL(config.jwksUrl),
      { cooldownDuration: config.jwksCooldownMs, cacheMaxAge: 10 * 60_000 },
    );
  }

  /** The principal `token` proves; an {@link UnauthorizedError} saying why when it proves none. */
  async authenticate(token: string): Promise<Principal> {
    const presented = digest(token);
    let admin = false;
    for (const known of this.#adminDigests) admin = sameDigest(presented, known) || admin;
    if (admin) return { kind: "admin" };
    if (this.#scraperDigest !== undefined && sameDigest(presented, this.#scraperDigest)) {
      return { kind: "scraper" };
    }
    if (token.split(".").length !== 3) {
      throw new UnauthorizedError("Unknown token: neither an admin token nor a JWT");
    }
    const cached = this.#verified.get(token);
    if (cached !== undefined) {
      if (Date.now() < cached.until) return cached.principal;
      this.#verified.delete(token);
    }
    const principal = await this.#verify(token);
    if (principal.kind !== "anonymous" && principal.expiresAt !== undefined) {
      if (this.#verified.size >= CACHE_ENTRIES) {
        this.#verified.delete(this.#verified.keys().next().value!);
      }
      this.#verified.set(token, {
        principal,
        until: Math.min(principal.expiresAt, Date.now() + CACHE_MS),
      });
    }
    return principal;
  }

  async #verify(token: string): Promise<Principal> {
    let algorithm: string | undefined;
    try {
      algorithm = decodeProtectedHeader(token).alg;
    } catch {
      throw new UnauthorizedError("Token is malformed");
    }
    const options = {
      audience: this.#config.audience,
      issuer: this.#config.issuer,
      requiredClaims: ["exp"],
    };
    let payload: JWTPayload;
    try {
      if (algorithm === "HS256" && this.#hmacKey !== undefined) {
        ({ payload } = await jwtVerify(token, await this.#hmacKey, {
          ...options,
          algorithms: ["HS256"],
        }));
      } else if (algorithm !== undefined && JWKS_ALGORITHMS.includes(algorithm) && this.#jwks) {
        ({ payload } = await jwtVerify(token, this.#jwks, {
          ...options,
          algorithms: JWKS_ALGORITHMS,
        }));
      } else {
        throw new UnauthorizedError(
          `Token algorithm ${algorithm ?? "(none)"} is not accepted here`,
        );
      }
    } catch (error) {
      if (error instanceof UnauthorizedError) throw error;
      throw new UnauthorizedError(reason(error));
    }
    const expiresAt = (payload.exp as number) * 1000;
    if (payload.admin === true) return { kind: "admin", expiresAt };
    const claim = payload.streams;
    if (!Array.isArray(claim) || !claim.every((s) => typeof s === "string")) {
      throw new UnauthorizedError(
        'Token grants nothing: its "streams" claim must be a list of names',
      );
    }
    const consumer = payload.consumer;
    if (consumer !== undefined && (typeof consumer !== "string" || !CONSUMER_ID.test(consumer))) {
      throw new UnauthorizedError(
        'Token is malformed: its "consumer" claim must be a consumer id (1 to 64 of A-Z, a-z, 0-9, _ and -)',
      );
    }
    const subject = typeof payload.sub === "string" ? payload.sub : undefined;
    return {
      kind: "consumer",
      streams: claim.includes("*") ? "*" : new Set(claim as string[]),
      subject,
      consumer: consumer ??
        (subject !== undefined && CONSUMER_ID.test(subject) ? subject : undefined),
      expiresAt,
    };
  }

  /** Whether consumer tokens can be minted: a JWT_SECRET is configured. */
  get canMint(): boolean {
    return this.#secret !== undefined;
  }

  /**
   * A consumer JWT (HS256) for `stream`, valid `ttlSeconds`, bound to the
   * relay consumer id `consumer` if given; with its expiry.
   */
  async mint(
    stream: string,
    ttlSeconds: number,
    consumer?: string,
  ): Promise<{ token: string; expiresAt: Date }> {
    const exp = Math.floor(Date.now() / 1000) + ttlSeconds;
    const jwt = new SignJWT({ streams: [stream], ...(consumer === undefined ? {} : { consumer }) })
      .setProtectedHeader({ alg: "HS256", typ: "JWT" })
      .setAudience(this.#config.audience)
      .setSubject(`minted:${crypto.randomUUID()}`)
      .setIssuedAt()
      .setExpirationTime(exp);
    if (this.#config.issuer !== undefined) jwt.setIssuer(this.#config.issuer);
    return { token: await jwt.sign(await this.#hmacKey!), expiresAt: new Date(exp * 1000) };
  }
}
