/**
 * Relay mode's consumers: a websocket attached to a durable JetStream
 * consumer of a stream's log, one connection per consumer id at a time
 * (a lease in NATS, renewed while connected, so a crashed instance's lease
 * lapses within seconds). Frames and acknowledgements are those of v1/v2:
 * the log's messages are the frames, verbatim; `{"lsn"}` acknowledges every
 * frame up to it (the consumer acknowledges "all"). Each connection starts
 * exactly after the consumer's acknowledged position: the durable consumer
 * is re-created from its acknowledgement floor, so nothing sent and not
 * acknowledged waits for a redelivery timeout, and nothing comes out of order.
 * @module
 */

import {
  AckPolicy,
  type Consumer,
  type ConsumerMessages,
  DeliverPolicy,
  type JsMsg,
} from "@nats-io/jetstream";
import { atTime } from "../deadline_timer.ts";
import { ConflictError } from "../errors.ts";
import { type Lsn, parseLsn, ZERO_LSN } from "../lsn.ts";
import { errorMessage, log } from "../observability/log.ts";
import { CloseCode, type CloseCodeValue } from "../protocol.ts";
import { drained, SOCKET_HIGH_WATER_BYTES, truncateReason } from "../streams/stream_session.ts";
import { readAck } from "../streams/ack_message.ts";
import { consumerName, type JetStreamLog, LEASE_TTL_MS, logName } from "./jetstream_log.ts";

/** Messages delivered and not acknowledged, at most, before JetStream waits for acks. */
const MAX_ACK_PENDING = 20_000;

/** The reason a consumer is told when its position is older than the log. */
function beyondRetentionReason(stream: string): string {
  return `consumer fell out of stream ${stream}'s log retention: read a fresh snapshot (reset), then a new consumer id`;
}

/** Everything a relay consumer needs to start. */
export interface RelayConsumerTarget {
  stream: string;
  consumer: string;
  /** Where the stream's current slot's frames begin in its log. */
  startSeq: number;
  /** When the credential expires (4401 then). */
  expiresAt?: number;
  instance: string;
}

/** One websocket consumer of a stream's log. */
export class RelaySession {
  readonly stream: string;
  readonly consumer: string;
  readonly #socket: WebSocket;
  readonly #abort = new AbortController();
  readonly #pending: { lsn: Lsn; message: JsMsg }[] = [];
  #delivered: Lsn = ZERO_LSN;
  #acked: Lsn = ZERO_LSN;
  #messages: ConsumerMessages | undefined;
  /** Settles once the socket closed and the lease was let go. */
  readonly done: Promise<void>;

  private constructor(socket: WebSocket, target: RelayConsumerTarget) {
    this.stream = target.stream;
    this.consumer = target.consumer;
    this.#socket = socket;
    socket.addEventListener("message", (event) => this.#onMessage(event));
    const closed = new Promise<void>((resolve) =>
      socket.addEventListener("close", () => resolve(), { once: true })
    );
    void closed.then(() => this.#abort.abort());
    if (target.expiresAt !== undefined) {
      const cancel = atTime(
        target.expiresAt,
        () => this.close(CloseCode.TokenExpired, "token expired; reconnect with a fresh token"),
      );
      this.#abort.signal.addEventListener("abort", cancel, { once: true });
    }
    this.done = closed;
  }

  /**
   * Takes the consumer's lease (a {@link ConflictError} if it is connected
   * elsewhere), positions its durable consumer after its last acknowledgement,
   * and upgrades `request`; a position older than the log closes with 4411.
   */
  static async accept(
    request: Request,
    relay: JetStreamLog,
    target: RelayConsumerTarget,
    sessions: Set<RelaySession>,
  ): Promise<Response> {
    const leaseKey = `${target.stream}.${target.consumer}`;
    try {
      await relay.leases.create(leaseKey, target.instance);
    } catch {
      throw new ConflictError(
        `Cannot stream: consumer "${target.consumer}" of stream "${target.stream}" is connected ` +
          `elsewhere; one connection per consumer id (retry in ${
            LEASE_TTL_MS / 1000
          } s if it died)`,
      );
    }
    const renew = setInterval(
      () => void relay.leases.put(leaseKey, target.instance).catch(() => {}),
      LEASE_TTL_MS / 3,
    );
    const release = () => {
      clearInterval(renew);
      void relay.leases.delete(leaseKey).catch(() => {});
    };
    try {
      await relay.ensure(target.stream);
      const start = await position(relay, target);
      const { socket, response } = Deno.upgradeWebSocket(request);
      const session = new RelaySession(socket, target);
      sessions.add(session);
      void session.done.finally(() => {
        sessions.delete(session);
        release();
      });
      socket.addEventListener("open", () => {
        if (start === "beyond retention") {
          log.info("consumer.refused", "a relay consumer's position is older than its log", {
            stream: target.stream,
            consumer: target.consumer,
          });
          return session.close(CloseCode.BeyondRetention, beyondRetentionReason(target.stream));
        }
        log.info(
          "consumer.connected",
          `consumer "${target.consumer}" of stream "${target.stream}" connected`,
          {
            stream: target.stream,
            consumer: target.consumer,
            fromSeq: start,
          },
        );
        void session.#pump(relay, start);
      }, { once: true });
      return response;
    } catch (error) {
      release();
      throw error;
    }
  }

  async #pump(relay: JetStreamLog, startSeq: number): Promise<void> {
    const signal = this.#abort.signal;
    const stream = logName(this.stream);
    const name = consumerName(this.consumer);
    let expected = startSeq;
    // Set when the durable consumer must be (re-)created at `expected`: frames went missing, or
    // it is gone (a reposition cut short between its delete and its add, say). Until that
    // succeeds every pull would fail, so it is retried first, each time round.
    let recreate = false;
    // Looked up once (an info request to JetStream), and again only after a failure.
    let consumer: Consumer | undefined;
    while (!signal.aborted) {
      try {
        if (recreate) {
          consumer = undefined;
          await reposition(relay, stream, name, expected);
          this.#pending.length = 0;
          recreate = false;
        }
        consumer ??= await relay.js.consumers.get(stream, name);
        // Batches pulled one after another, each yielding its frames as they arrive.
        const messages = await consumer.fetch({ max_messages: 256, expires: 5000 });
        this.#messages = messages;
        for await (const message of messages) {
          if (signal.aborted) break;
          // Sent on this socket already (a redelivery): not again.
          if (message.seq < expected) continue;
          if (message.seq > expected) {
            const { first_seq } = (await relay.jsm.streams.info(stream)).state;
            if (expected < first_seq) {
              // Retention dropped frames this consumer had not read: never skip them silently.
              return this.close(CloseCode.BeyondRetention, beyondRetentionReason(this.stream));
            }
            // Frames lost on the way (a NATS reconnect): start the consumer again where we are.
            log.warn("relay.reposition", "a relay consumer missed frames in transit; resuming", {
              stream: this.stream,
              consumer: this.consumer,
              expected,
              got: message.seq,
            });
            recreate = true;
            break;
          }
          expected = message.seq + 1;
          const id = message.headers?.get("Nats-Msg-Id") ?? "";
          this.#socket.send(message.string());
          if (!id.includes("+")) {
            const lsn = parseLsn(id);
            this.#delivered = lsn;
            this.#pending.push({ lsn, message });
          }
          if (this.#socket.bufferedAmount > SOCKET_HIGH_WATER_BYTES) {
            await drained(this.#socket, signal);
          }
        }
      } catch (error) {
        if (signal.aborted) return;
        consumer = undefined;
        if ((error as Error).name === "ConsumerNotFoundError") recreate = true;
        // A pull that failed (missed heartbeats, a NATS reconnect): pull again; what it had in
        // flight is redelivered after the ack wait, and what was sent already is skipped.
        log.debug("relay.fetch_failed", "a relay consumer's pull failed; pulling again", {
          stream: this.stream,
          consumer: this.consumer,
          error: errorMessage(error),
        });
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  }

  #onMessage(event: MessageEvent): void {
    const lsn = readAck(event.data, this.#delivered);
    if (typeof lsn !== "bigint") return this.close(lsn.code, lsn.reason);
    if (lsn <= this.#acked) return;
    this.#acked = lsn;
    // "All" acknowledgement: the latest whole frame at or before lsn confirms every one before it.
    let last: JsMsg | undefined;
    while (this.#pending.length > 0 && this.#pending[0].lsn <= lsn) {
      last = this.#pending.shift()!.message;
    }
    last?.ack();
  }

  /** Closes the socket with `code` and `reason`. */
  close(code: CloseCodeValue, reason: string): void {
    this.#abort.abort();
    void this.#messages?.close().catch(() => {});
    if (this.#socket.readyState <= WebSocket.OPEN) {
      try {
        this.#socket.close(code, truncateReason(reason));
      } catch { /* closing */ }
    }
  }
}

/**
 * Where the consumer's connection starts in the log: after its acknowledged
 * position (its durable consumer re-created from there), or at the current
 * slot's first frame for a new consumer; "beyond retention" when the log no
 * longer has that frame.
 */
async function position(
  relay: JetStreamLog,
  target: RelayConsumerTarget,
): Promise<number | "beyond retention"> {
  const stream = logName(target.stream);
  const name = consumerName(target.consumer);
  const existing = await relay.jsm.consumers.info(stream, name).catch(() => undefined);
  const state = (await relay.jsm.streams.info(stream)).state;
  const start = existing === undefined
    ? target.startSeq
    : Math.max(existing.ack_floor.stream_seq + 1, 1);
  // The frames from `start` on must all be in the log (or not written yet).
  const oldest = state.messages === 0 ? state.last_seq + 1 : state.first_seq;
  if (start < target.startSeq || start < oldest) return "beyond retention";
  await reposition(relay, stream, name, start, existing !== undefined);
  return start;
}

/** (Re-)creates the durable consumer `name` of `stream`, delivering from `start`. */
async function reposition(
  relay: JetStreamLog,
  stream: string,
  name: string,
  start: number,
  exists = true,
): Promise<void> {
  if (exists) await relay.jsm.consumers.delete(stream, name).catch(() => {});
  await relay.jsm.consumers.add(stream, {
    durable_name: name,
    ack_policy: AckPolicy.All,
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: start,
    max_ack_pending: MAX_ACK_PENDING,
    // A delivery lost in transit comes again after this; one sent already is skipped.
    ack_wait: 10e9,
  });
}
