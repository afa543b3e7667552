/**
 * The checks of RFC 6455 §4.2.1 on a websocket upgrade request, made before
 * any work is done for it: `Deno.upgradeWebSocket` throws on a broken
 * handshake, and by then a replication connection may already be open.
 * @module
 */

import { HttpError } from "./http_error.ts";

/** The only websocket protocol version there is (RFC 6455). */
export const WEBSOCKET_VERSION = "13";

function tokens(header: string | null): string[] {
  return (header ?? "").split(",").map((token) => token.trim().toLowerCase());
}

/** Whether `key` is base64 of exactly 16 bytes, as `Sec-WebSocket-Key` must be. */
function isHandshakeKey(key: string | null): boolean {
  if (key === null || !/^[A-Za-z0-9+/]{22}==$/.test(key.trim())) return false;
  return atob(key.trim()).length === 16;
}

/**
 * Throws an `HttpError` unless `request` is a websocket upgrade that
 * `Deno.upgradeWebSocket` will accept: 426 when it asks for no upgrade (or
 * an unsupported version), 400 when the handshake is malformed.
 */
export function assertWebSocketHandshake(request: Request, action: string): void {
  if (!tokens(request.headers.get("upgrade")).includes("websocket")) {
    throw new HttpError(426, `${action}: this endpoint needs a websocket upgrade`, {
      upgrade: "websocket",
    });
  }
  const problem = request.method !== "GET"
    ? "the method must be GET"
    : !tokens(request.headers.get("connection")).includes("upgrade")
    ? 'the "Connection" header must include "Upgrade"'
    : !isHandshakeKey(request.headers.get("sec-websocket-key"))
    ? 'the "Sec-WebSocket-Key" header must be 16 bytes in base64'
    : undefined;
  if (problem !== undefined) {
    throw new HttpError(400, `${action}: invalid websocket handshake: ${problem}`);
  }
  if (request.headers.get("sec-websocket-version")?.trim() !== WEBSOCKET_VERSION) {
    throw new HttpError(
      426,
      `${action}: invalid websocket handshake: only Sec-WebSocket-Version ${WEBSOCKET_VERSION} is supported`,
      { "sec-websocket-version": WEBSOCKET_VERSION, upgrade: "websocket" },
    );
  }
}
