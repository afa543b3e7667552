/**
 * The server's permissions, derived from its configuration so that they
 * stay narrow: the network, exactly the environment variables it reads, and
 * read (and, for a Unix socket, write) access to exactly the files its
 * database settings name — the CA, the client certificate and key, the
 * password file, the socket. Nothing else on the disk. The launcher
 * (`deno task start`, the container) passes them; a compiled binary carries
 * those it was compiled with, and {@link missingPermissions} says which
 * paths it lacks.
 * @module
 */

import { type DatabaseConfig, ENV_VARS } from "./config.ts";

/** V8's flags for the server: a small young generation keeps its memory flat under load. */
export const V8_FLAGS = "--v8-flags=--max-semi-space-size=8";

/** The paths `db` names: files to read, and sockets to read and write. */
export function databasePaths(db: DatabaseConfig): { read: string[]; write: string[] } {
  const read = new Set<string>();
  const write = new Set<string>();
  // The password file only matters when no password is given.
  const passfile = db.password === undefined ? db.passfile : undefined;
  for (const file of [db.sslrootcert, db.sslcert, db.sslkey, passfile]) {
    if (file !== undefined && file !== "system") read.add(file);
  }
  for (const { host, port } of db.hosts ?? [db]) {
    if (!host.startsWith("/")) continue;
    const socket = `${host}/.s.PGSQL.${port}`;
    read.add(socket);
    write.add(socket);
  }
  for (const path of [...read, ...write]) {
    if (path.includes(",")) {
      throw new RangeError(
        `The path ${JSON.stringify(path)} has a comma, which permission flags cannot hold: ` +
          "rename the file",
      );
    }
  }
  return { read: [...read], write: [...write] };
}

/** The permission and V8 flags the server runs with under `db`. */
export function serverFlags(db: DatabaseConfig): string[] {
  const { read, write } = databasePaths(db);
  return [
    V8_FLAGS,
    "--allow-net",
    `--allow-env=${ENV_VARS.join(",")}`,
    ...(read.length > 0 ? [`--allow-read=${read.join(",")}`] : []),
    ...(write.length > 0 ? [`--allow-write=${write.join(",")}`] : []),
  ];
}

/** The paths `db` names that this process may not use (a binary compiled for other settings). */
export function missingPermissions(db: DatabaseConfig): string[] {
  const { read, write } = databasePaths(db);
  return [
    ...read.filter((path) => Deno.permissions.querySync({ name: "read", path }).state !== "granted")
      .map((path) => `read ${path}`),
    ...write.filter((path) =>
      Deno.permissions.querySync({ name: "write", path }).state !== "granted"
    ).map((path) => `write ${path}`),
  ];
}
