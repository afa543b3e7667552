/**
 * Test support: a private CA and certificates made with openssl, and a
 * PostgreSQL that takes only TLS over TCP (`ssl=on`, `hostnossl … reject`),
 * as managed providers serve it, with a Unix socket for the rest.
 * @module
 */

import { serverUser } from "../../src/dev/embedded_postgres.ts";
import type { DatabaseConfig } from "../../src/config.ts";
import { sql, startPostgres } from "./harness.ts";

/** The files of a test PKI. */
export interface Certificates {
  dir: string;
  /** The CA that signs the server's and the client's certificates. */
  ca: string;
  /** A CA that signed nothing here: trusting it must fail. */
  otherCa: string;
  serverCert: string;
  serverKey: string;
  /** A client certificate for the role `certuser`, and its key. */
  clientCert: string;
  clientKey: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const { success, stderr } = await new Deno.Command("openssl", { args, cwd, stdout: "null" })
    .output();
  if (!success) throw new Error(`openssl ${args[0]} failed: ${new TextDecoder().decode(stderr)}`);
}

const KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/** A CA, and a certificate it signs for `subject` with `extensions`. */
async function signed(
  dir: string,
  name: string,
  subject: string,
  extensions: string,
): Promise<void> {
  await Deno.writeTextFile(`${dir}/${name}.ext`, extensions);
  await openssl(
    ["req", ...KEY, "-subj", subject, "-keyout", `${name}.key`, "-out", `${name}.csr`],
    dir,
  );
  await openssl([
    "x509",
    "-req",
    "-in",
    `${name}.csr`,
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "2",
    "-out",
    `${name}.pem`,
    "-extfile",
    `${name}.ext`,
  ], dir);
}

/**
 * Makes a CA, a server certificate for `localhost` only (so that verify-full
 * through 127.0.0.1 fails and verify-ca passes), a client certificate for
 * `certuser`, and an unrelated CA.
 */
export async function makeCertificates(): Promise<Certificates> {
  const dir = await Deno.makeTempDir({ prefix: "pgds-tls-" });
  await Deno.chmod(dir, 0o755);
  for (const ca of ["ca", "other-ca"]) {
    await openssl([
      "req",
      "-x509",
      ...KEY,
      "-days",
      "2",
      "-subj",
      `/CN=pgdeltastream test ${ca}`,
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
      "-keyout",
      `${ca}.key`,
      "-out",
      `${ca}.pem`,
    ], dir);
  }
  await signed(
    dir,
    "server",
    "/CN=localhost",
    "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n" +
      "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
  );
  await signed(
    dir,
    "client",
    "/CN=certuser",
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
  );
  // PostgreSQL refuses a key others can read; as root it runs as postgres, which must own it.
  const user = await serverUser();
  for (const file of ["server.key", "client.key"]) {
    await Deno.chmod(`${dir}/${file}`, 0o600);
  }
  if (user !== undefined) await Deno.chown(`${dir}/server.key`, user.uid, user.gid);
  for (const file of ["ca.pem", "other-ca.pem", "server.pem", "client.pem"]) {
    await Deno.chmod(`${dir}/${file}`, 0o644);
  }
  return {
    dir,
    ca: `${dir}/ca.pem`,
    otherCa: `${dir}/other-ca.pem`,
    serverCert: `${dir}/server.pem`,
    serverKey: `${dir}/server.key`,
    clientCert: `${dir}/client.pem`,
    clientKey: `${dir}/client.key`,
  };
}

/** The password of the role `app` the TLS PostgreSQL has. */
export const APP_PASSWORD = "tls-test-password";

/** A PostgreSQL that takes TLS only over TCP; `local` (its socket) is for setup and socket tests. */
export interface TlsPostgres extends AsyncDisposable {
  port: number;
  /** The Unix-socket directory. */
  socketDir: string;
  /** The superuser over the socket (trust): for the tests' own statements. */
  admin: DatabaseConfig;
  certificates: Certificates;
}

/**
 * Starts it: roles `app` (password, superuser) and `certuser` (client
 * certificate), a table `items`; over TCP only `hostssl` lines (`cert` for
 * certuser), `hostnossl` rejected; over the socket `app` by password.
 */
export async function startTlsPostgres(): Promise<TlsPostgres> {
  const certificates = await makeCertificates();
  const socketDir = await Deno.makeTempDir({ prefix: "pgds-sock-" });
  await Deno.chmod(socketDir, 0o777);
  const postgres = await startPostgres({
    settings: {
      ssl: "on",
      ssl_cert_file: certificates.serverCert,
      ssl_key_file: certificates.serverKey,
      ssl_ca_file: certificates.ca,
      unix_socket_directories: socketDir,
    },
  });
  const admin: DatabaseConfig = {
    host: socketDir,
    port: postgres.port,
    user: "postgres",
    database: "postgres",
    application_name: "tests",
  };
  await sql(
    admin,
    `CREATE ROLE app LOGIN SUPERUSER REPLICATION PASSWORD '${APP_PASSWORD}';
     CREATE ROLE certuser LOGIN SUPERUSER REPLICATION;
     CREATE TABLE items(id int primary key, name text);
     INSERT INTO items VALUES (1, 'one'), (2, 'two')`,
  );
  await Deno.writeTextFile(
    `${postgres.dataDir}/pg_hba.conf`,
    [
      "local all postgres trust",
      "local all app scram-sha-256",
      "local replication app scram-sha-256",
      "hostssl all certuser 127.0.0.1/32 cert",
      "hostssl replication certuser 127.0.0.1/32 cert",
      "hostssl all app 127.0.0.1/32 scram-sha-256",
      "hostssl replication app 127.0.0.1/32 scram-sha-256",
      "hostnossl all all 0.0.0.0/0 reject",
      "hostnossl replication all 0.0.0.0/0 reject",
      "",
    ].join("\n"),
  );
  await sql(admin, "SELECT pg_reload_conf()");
  return {
    port: postgres.port,
    socketDir,
    admin,
    certificates,
    async [Symbol.asyncDispose]() {
      await postgres[Symbol.asyncDispose]();
      await Deno.remove(socketDir, { recursive: true }).catch(() => {});
      await Deno.remove(certificates.dir, { recursive: true }).catch(() => {});
    },
  };
}
