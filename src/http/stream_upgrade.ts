/**
 * Accepting a stream request: the websocket handshake is checked, the slot
 * claimed and its replication started before the upgrade, so that a 404 or
 * 409 is an HTTP answer; and a failure after replication started closes it,
 * never leaving a walsender holding the slot.
 * @module
 */

import {
  type ReplicationOptions,
  type ReplicationService,
  startReplication,
} from "../replication/replication_service.ts";
import type { SessionRegistry } from "../streams/session_registry.ts";
import {
  type SessionMonitor,
  type SessionObserver,
  StreamSession,
} from "../streams/stream_session.ts";
import { assertWebSocketHandshake } from "./websocket_handshake.ts";

/** What a stream request is for. */
export interface StreamTarget {
  /** The slot to stream. */
  slotName: string;
  /** Names it in messages, e.g. `slot "delta_x1"` or `stream "orders"`. */
  label: string;
  /** Checks before replication starts (the slot exists, its plugin is pgoutput, …). */
  prepare: () => Promise<void>;
  /** How replication is started. */
  options: ReplicationOptions;
  /** How long to wait for a walsender that is going away. */
  busyTimeoutSeconds: number;
  /** Watches the session (tails, metrics). */
  observer?: SessionObserver;
  /** When the client's credential expires (ms since the epoch): the socket closes with 4401 then. */
  expiresAt?: number;
  /** A check the session repeats (at once, then every `intervalMs`): a reason closes it with 4422. */
  monitor?: SessionMonitor;
}

/** Upgrades `request` to a websocket streaming `target`'s slot, registered in `sessions`. */
export async function acceptStream(
  request: Request,
  sessions: SessionRegistry,
  target: StreamTarget,
): Promise<Response> {
  assertWebSocketHandshake(request, "Cannot stream");
  const claim = await sessions.claim(target.slotName, target.label);
  let service: ReplicationService | undefined;
  try {
    await target.prepare();
    service = await startReplication(target.options, target.busyTimeoutSeconds);
    const { socket, response } = Deno.upgradeWebSocket(request);
    claim.attach(
      new StreamSession(socket, service, {
        observer: target.observer,
        expiresAt: target.expiresAt,
        monitor: target.monitor,
      }),
    );
    return response;
  } catch (error) {
    await service?.close();
    claim.release();
    throw error;
  }
}
