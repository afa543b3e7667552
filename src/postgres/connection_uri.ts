/**
 * libpq's connection URI (`postgresql://user:password@host:port/dbname?k=v`),
 * parsed as libpq parses it: percent-decoding in every part, a host that is
 * a Unix-socket directory (percent-encoded, or `?host=/dir`), IPv6 hosts in
 * brackets, and the query parameters libpq knows. Errors never repeat the
 * URI: it may hold a password.
 *
 * https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING-URIS
 * @module
 */

/** The connection parameters a URI names, by libpq's keyword (`host`, `sslmode`, …). */
export type ConnectionParameters = Partial<Record<ConnectionKeyword, string>>;

/** The keywords the server understands, in URIs and as their `PG*` variables. */
export const CONNECTION_KEYWORDS = [
  "host",
  "port",
  "dbname",
  "user",
  "password",
  "passfile",
  "options",
  "sslmode",
  "sslrootcert",
  "sslcert",
  "sslkey",
  "sslnegotiation",
  "connect_timeout",
  "keepalives",
  "keepalives_idle",
  "target_session_attrs",
  "load_balance_hosts",
] as const;

/** A keyword of {@link CONNECTION_KEYWORDS}. */
export type ConnectionKeyword = typeof CONNECTION_KEYWORDS[number];

/**
 * Keywords libpq knows that change nothing here, accepted so that a
 * provider's URI works as given; with the values that may be ignored (none
 * listed: any). A value that asks for what the server cannot do (GSSAPI
 * encryption, channel binding required) is refused rather than ignored.
 */
const IGNORED = new Map<string, string[] | undefined>([
  ["client_encoding", ["UTF8", "utf8", "auto"]],
  ["application_name", undefined], // the server names its connections itself (pgdeltastream)
  ["fallback_application_name", undefined],
  ["keepalives_interval", undefined], // the runtime sets only the idle time
  ["keepalives_count", undefined],
  ["tcp_user_timeout", undefined],
  ["gssencmode", ["disable", "prefer"]],
  ["sslcompression", undefined],
  ["channel_binding", ["disable", "prefer"]],
]);

const URI = /^postgres(?:ql)?:\/\/(?:([^@/?#]*)@)?([^/?#]*)(?:\/([^?#]*))?(?:\?([^#]*))?$/;

/** Percent-decodes `text` (part `what` of the URI); a `RangeError` naming the part if malformed. */
function decode(text: string, what: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw new RangeError(`DATABASE_URL is invalid: its ${what} has a malformed %-escape`);
  }
}

/** Parses a libpq connection URI; a `RangeError` saying what is wrong (never echoing the URI). */
export function parseConnectionUri(uri: string): ConnectionParameters {
  const match = URI.exec(uri);
  if (match === null) {
    throw new RangeError(
      "DATABASE_URL is invalid: expected postgresql://user:password@host:port/database?parameters",
    );
  }
  const [, userinfo, hostport, path, query] = match;
  const out: ConnectionParameters = {};
  if (userinfo !== undefined) {
    const colon = userinfo.indexOf(":");
    const user = colon === -1 ? userinfo : userinfo.slice(0, colon);
    if (user !== "") out.user = decode(user, "user name");
    if (colon !== -1) out.password = decode(userinfo.slice(colon + 1), "password");
  }
  if (hostport !== "") {
    // Several hosts, as libpq takes them: host1:port1,host2:port2 (a port each, or none).
    const hosts: string[] = [];
    const ports: string[] = [];
    for (const part of hostport.split(",")) {
      const v6 = /^\[([^\]]*)\](?::(.*))?$/.exec(part);
      const colon = part.lastIndexOf(":");
      const [host, port] = v6 !== null
        ? [v6[1], v6[2]]
        : colon === -1
        ? [part, undefined]
        : [part.slice(0, colon), part.slice(colon + 1)];
      hosts.push(decode(host, "host"));
      ports.push(port === undefined ? "" : decode(port, "port"));
    }
    if (hosts.some((h) => h !== "")) out.host = hosts.join(",");
    if (ports.some((p) => p !== "")) out.port = ports.join(",");
  }
  if (path !== undefined && path !== "") out.dbname = decode(path, "database name");
  for (const pair of (query ?? "").split("&").filter(Boolean)) {
    const equals = pair.indexOf("=");
    if (equals === -1) {
      throw new RangeError(`DATABASE_URL is invalid: parameter "${pair}" has no value`);
    }
    const key = decode(pair.slice(0, equals), "parameter name");
    const value = decode(pair.slice(equals + 1), `parameter ${key}`);
    if ((CONNECTION_KEYWORDS as readonly string[]).includes(key)) {
      out[key as ConnectionKeyword] = value;
    } else if (!IGNORED.has(key)) {
      throw new RangeError(
        `DATABASE_URL is invalid: unknown parameter "${key}"; known: ${
          CONNECTION_KEYWORDS.join(", ")
        }`,
      );
    } else if (IGNORED.get(key) !== undefined && !IGNORED.get(key)!.includes(value)) {
      throw new RangeError(
        `DATABASE_URL is invalid: ${key}=${value} is not supported (only ${
          IGNORED.get(key)!.join(", ")
        })`,
      );
    }
  }
  return out;
}
