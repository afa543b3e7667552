/**
 * libpq's password file (`PGPASSFILE`, default `~/.pgpass`): lines of
 * `hostname:port:database:username:password`, `*` matching anything, `\`
 * escaping `:` and `\`, the first matching line winning. As libpq does, a
 * file that others may read is ignored (with a warning), and `localhost`
 * matches a connection over the default Unix-socket directory too.
 *
 * https://www.postgresql.org/docs/current/libpq-pgpass.html
 * @module
 */

/** Unix-socket directories libpq is built with by default (Debian's, and upstream's). */
const DEFAULT_SOCKET_DIRS = new Set(["/var/run/postgresql", "/run/postgresql", "/tmp"]);

/** What a password is looked up for. */
export interface PasswordTarget {
  host: string;
  port: number;
  database: string;
  user: string;
}

/** Splits one line at unescaped `:` into its fields, unescaping `\:` and `\\`. */
function fields(line: string): string[] {
  const out: string[] = [];
  let field = "";
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (c === "\\" && i + 1 < line.length) field += line[++i];
    else if (c === ":") {
      out.push(field);
      field = "";
    } else field += c;
  }
  out.push(field);
  return out;
}

/**
 * The password `text` (a password file's contents) gives `target`, if a
 * line matches; `undefined` otherwise.
 */
export function passwordFrom(text: string, target: PasswordTarget): string | undefined {
  const hosts = [target.host];
  if (target.host.startsWith("/") && DEFAULT_SOCKET_DIRS.has(target.host)) hosts.push("localhost");
  for (const line of text.split(/\r?\n/)) {
    if (line.trim() === "" || line.startsWith("#")) continue;
    const parts = fields(line);
    if (parts.length < 5) continue;
    const [host, port, database, user] = parts;
    const password = parts.slice(4).join(":");
    const matches = (pattern: string, value: string) => pattern === "*" || pattern === value;
    if (
      hosts.some((h) => matches(host, h)) && matches(port, String(target.port)) &&
      matches(database, target.database) && matches(user, target.user)
    ) {
      return password;
    }
  }
  return undefined;
}

/**
 * The password for `target` from the password file at `path`, read now (so
 * a changed file counts at the next connection); none if the file is
 * missing, has no matching line, or may be read by others (`warn` is told).
 */
export async function lookupPassword(
  path: string,
  target: PasswordTarget,
  warn: (message: string) => void,
): Promise<string | undefined> {
  let text: string;
  try {
    const info = await Deno.stat(path);
    if (!info.isFile) return undefined;
    if (info.mode !== null && (info.mode & 0o077) !== 0) {
      warn(
        `password file ${path} has group or world access; it is ignored: chmod 0600 ${path}`,
      );
      return undefined;
    }
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  return passwordFrom(text, target);
}
