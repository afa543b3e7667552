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
  closeSocket,
  ConsumerSession,
  type SessionMonitor,
  type SessionObserver,
} from "../streams/consumer_session.ts";
import { replicationSource } from "../streams/replication_source.ts";
import { assertWebSocketHandshake } from "./websocket_handshake.ts";
import type pg from "pg";
import { formatLsn } from "../lsn.ts";
import { log } from "../observability/log.ts";
import { CloseCode } from "../protocol.ts";
import type { Metrics } from "../observability/metrics.ts";
import { slotInvalidatedReason, streamInvalidatedReason } from "../streams/stream_manager.ts";

/** What accepting a stream uses of the server. */
export interface StreamHost {
  sessions: SessionRegistry;
  pool: pg.Pool;
  metrics?: Metrics;
}

/** Labels of streams whose replication was lost, until a consumer resumes them. */
const lost = new Set<string>();

/** What a stream request is for. */
export interface StreamTarget {
  /** The slot to stream. */
  slotName: string;
  /** The stream's name in metrics and logs: a v2 stream's name, or `v1`. */
  stream: string;
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

/**
 * The answer to a consumer of an invalidated stream (or v1 slot), in
 * websocket terms: the socket opens, then closes with 4410 and `reason`.
 */
export function refuseInvalidated(
  request: Request,
  kind: "stream" | "slot",
  name: string,
): Response {
  const label = `${kind} "${name}"`;
  log.info("consumer.refused", `a consumer of the invalidated ${label} was told 4410`, { label });
  const reason = kind === "stream" ? streamInvalidatedReason(name) : slotInvalidatedReason(name);
  return closeAtOnce(request, CloseCode.StreamInvalidated, reason);
}

/** Upgrades `request` and closes the socket at once with `code` and `reason`: a final answer in websocket terms. */
function closeAtOnce(request: Request, code: number, reason: string): Response {
  const { socket, response } = Deno.upgradeWebSocket(request);
  closeSocket(socket, code, reason);
  return response;
}

/** The slot's confirmed position: where a stream resumes. */
async function resumePosition(pool: pg.Pool, slotName: string): Promise<string | null> {
  const { rows } = await pool.query<{ lsn: string | null }>(
    "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = $1",
    [slotName],
  ).catch(() => ({ rows: [] }));
  return rows[0]?.lsn ?? null;
}

/** One observer of `a` and `b`, each optional. */
function both(a: SessionObserver | undefined, b: SessionObserver | undefined): SessionObserver {
  if (a === undefined || b === undefined) return a ?? b ?? {};
  return {
    sent: (frame) => {
      a.sent?.(frame);
      b.sent?.(frame);
    },
    acknowledged: (lsn) => {
      a.acknowledged?.(lsn);
      b.acknowledged?.(lsn);
    },
  };
}

/** Upgrades `request` to a websocket streaming `target`'s slot, registered in `host.sessions`. */
export async function acceptStream(
  request: Request,
  host: StreamHost,
  target: StreamTarget,
): Promise<Response> {
  assertWebSocketHandshake(request, "Cannot stream");
  const claim = await host.sessions.claim(target.slotName, target.label);
  let service: ReplicationService | undefined;
  try {
    await target.prepare();
    service = await startReplication(target.options, target.busyTimeoutSeconds);
    const resumeFrom = await resumePosition(host.pool, target.slotName);
    const { socket, response } = Deno.upgradeWebSocket(request);
    const metrics = host.metrics?.session(target.stream);
    const session = new ConsumerSession(socket, replicationSource(service), {
      label: target.label,
      observer: both(target.observer, metrics),
      expiresAt: target.expiresAt,
      monitor: target.monitor,
    });
    claim.attach(session);
    const fields = { stream: target.stream, slot: target.slotName };
    log.info(
      lost.delete(target.label) ? "replication.resumed" : "consumer.connected",
      `a consumer connected to ${target.label}`,
      { ...fields, resumeAfter: resumeFrom },
    );
    void session.done.finally(() => {
      metrics?.ended();
      const { code, reason, by, acked } = session.outcome;
      if (code === CloseCode.TryAgainLater) lost.add(target.label);
      log.info("consumer.disconnected", `the consumer of ${target.label} disconnected`, {
        ...fields,
        code,
        reason,
        closedBy: by,
        lastAck: acked === 0n ? undefined : formatLsn(acked),
      });
    });
    return response;
  } catch (error) {
    await service?.close();
    claim.release();
    throw error;
  }
}
