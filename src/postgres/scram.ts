/**
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it for password
 * authentication, on WebCrypto; without channel binding (`n,,`), as libpq
 * does when the connection is not TLS or binding is not required.
 * @module
 */

const encoder = new TextEncoder();

function base64(bytes: Uint8Array): string {
  return btoa(String.fromCharCode(...bytes));
}

function unbase64(text: string): Uint8Array<ArrayBuffer> {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

type Bytes = Uint8Array<ArrayBuffer>;

async function hmac(key: Bytes, message: string): Promise<Bytes> {
  const imported = await crypto.subtle.importKey(
    "raw",
    key,
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  return new Uint8Array(await crypto.subtle.sign("HMAC", imported, encoder.encode(message)));
}

/** Parses `k=v,k=v` attributes of a SCRAM message. */
function attributes(message: string): Map<string, string> {
  const map = new Map<string, string>();
  for (const part of message.split(",")) {
    const at = part.indexOf("=");
    if (at > 0) map.set(part.slice(0, at), part.slice(at + 1));
  }
  return map;
}

/** One SCRAM-SHA-256 exchange: the three client messages, then the check of the server's signature. */
export class ScramClient {
  readonly #password: string;
  readonly #nonce: string;
  #authMessage = "";
  #serverSignature = "";

  /** Starts an exchange for `password` (normalized with NFKC, SASLprep's core). */
  constructor(password: string) {
    this.#password = password.normalize("NFKC");
    this.#nonce = base64(crypto.getRandomValues(new Uint8Array(18)));
  }

  /** The mechanism name PostgreSQL offers. */
  static readonly mechanism = "SCRAM-SHA-256";

  /** client-first-message: no channel binding, no user name (PostgreSQL takes the startup user). */
  first(): string {
    return `n,,${this.#bare()}`;
  }

  #bare(): string {
    return `n=,r=${this.#nonce}`;
  }

  /** client-final-message, from the server-first-message. */
  async final(serverFirst: string): Promise<string> {
    const server = attributes(serverFirst);
    const nonce = server.get("r");
    const salt = server.get("s");
    const iterations = Number(server.get("i"));
    if (!nonce?.startsWith(this.#nonce) || salt === undefined || !(iterations > 0)) {
      throw new Error("SCRAM: the server's first message is invalid");
    }
    const withoutProof = `c=biws,r=${nonce}`;
    this.#authMessage = `${this.#bare()},${serverFirst},${withoutProof}`;
    const key = await crypto.subtle.importKey(
      "raw",
      encoder.encode(this.#password),
      "PBKDF2",
      false,
      ["deriveBits"],
    );
    const salted = new Uint8Array(
      await crypto.subtle.deriveBits(
        {
          name: "PBKDF2",
          hash: "SHA-256",
          salt: unbase64(salt) as Uint8Array<ArrayBuffer>,
          iterations,
        },
        key,
        256,
      ),
    );
    const clientKey = await hmac(salted, "Client Key");
    const storedKey = new Uint8Array(await crypto.subtle.digest("SHA-256", clientKey));
    const signature = await hmac(storedKey, this.#authMessage);
    const proof = clientKey.map((byte, i) => byte ^ signature[i]);
    this.#serverSignature = base64(await hmac(await hmac(salted, "Server Key"), this.#authMessage));
    return `${withoutProof},p=${base64(proof)}`;
  }

  /** Checks the server-final-message: the server proves it knew the password too. */
  verify(serverFinal: string): void {
    const server = attributes(serverFinal);
    if (server.has("e")) throw new Error(`SCRAM: the server refused: ${server.get("e")}`);
    if (this.#serverSignature === "" || server.get("v") !== this.#serverSignature) {
      throw new Error("SCRAM: the server's signature is wrong; it does not know the password");
    }
  }
}
