/**
 * Who a request comes from, once its credential is checked, and what that
 * lets it do.
 * @module
 */

/** An admin: may do everything. */
export interface Admin {
  kind: "admin";
  /** When its credential (a JWT with `"admin": true`) expires, in ms since the epoch; never for a token. */
  expiresAt?: number;
}

/** A consumer: may read the streams its JWT grants. */
export interface Consumer {
  kind: "consumer";
  /** The granted stream names, or `"*"` for every stream. */
  streams: ReadonlySet<string> | "*";
  /** The JWT's `sub`, if any. */
  subject?: string;
  /**
   * Relay mode: the only consumer id the token may connect as — its
   * `consumer` claim, else its `sub` where that is a consumer id. None: any.
   */
  consumer?: string;
  /** When its JWT expires, in ms since the epoch. */
  expiresAt: number;
}

/** A scraper with `METRICS_TOKEN`: may read `/metrics`, nothing else. */
export interface Scraper {
  kind: "scraper";
  /** Never set: the token does not expire. */
  expiresAt?: undefined;
}

/** A client that sent no credential. */
export interface Anonymous {
  kind: "anonymous";
}

/** The principal a request acts as. */
export type Principal = Admin | Consumer | Scraper | Anonymous;

/** Whether `principal` may read the stream `name` (its snapshot, changes, tail, state). */
export function mayRead(principal: Principal, name: string): boolean {
  if (principal.kind === "admin") return true;
  if (principal.kind !== "consumer") return false;
  return principal.streams === "*" || principal.streams.has(name);
}
