/**
 * Relay mode's consumers: a consumer session (the same core as a plain
 * stream's: frames, partial frames, acks, close codes) whose source is a
 * durable JetStream consumer of the stream's log, one connection per
 * consumer id at a time (a lease in NATS, renewed while connected, so a
 * crashed instance's lease lapses within seconds). The log's messages are
 * the frames, verbatim. Each connection starts exactly after the consumer's
 * acknowledged position: the durable consumer is re-created from its
 * acknowledgement floor, so nothing sent and not acknowledged waits for a
 * redelivery timeout, and nothing comes out of order.
 * @module
 */

import {
  AckPolicy,
  type Consumer,
  type ConsumerMessages,
  DeliverPolicy,
  type JsMsg,
} from "@nats-io/jetstream";
import { ConflictError } from "../errors.ts";
import { type Lsn, parseLsn, ZERO_LSN } from "../lsn.ts";
import { errorMessage, log } from "../observability/log.ts";
import { CloseCode } from "../protocol.ts";
import {
  ConsumerSession,
  type FrameSource,
  type OutgoingFrame,
  SourceClosed,
} from "../streams/consumer_session.ts";
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

/** `{"nextlsn":"X/Y"`: a frame's own position, at its start. */
const FRAME_HEAD = /^\{"nextlsn":"([0-9A-F]+\/[0-9A-F]+)"/;

/**
 * A consumer's frames from the stream's log, as a consumer session's
 * {@link FrameSource}: its durable JetStream consumer's messages in order,
 * from `start`, pulled batch after batch; acknowledgements confirm every
 * frame up to them (the consumer acknowledges "all"). A position older than
 * the log, or a gap in it, ends the source with 4411: nothing is skipped
 * silently.
 */
class LogSource implements FrameSource {
  readonly #relay: JetStreamLog;
  readonly #target: RelayConsumerTarget;
  readonly #stream: string;
  readonly #name: string;
  /** The next sequence this consumer must get, or why it cannot start. */
  #expected: number | "beyond retention";
  /** Whole frames sent and not acknowledged, with their messages (acknowledging one confirms all before). */
  readonly #pending: { lsn: Lsn; message: JsMsg }[] = [];
  /** The last whole frame sent: what acknowledging a partial chunk after it confirms. */
  #lastWhole: Lsn = ZERO_LSN;
  #consumer: Consumer | undefined;
  #messages: ConsumerMessages | undefined;
  #iterator: AsyncIterator<JsMsg> | undefined;
  /**
   * The durable consumer must be (re-)created at `#expected`: frames went
   * missing, or it is gone (a reposition cut short between its delete and
   * its add, say). Until that succeeds every pull would fail.
   */
  #recreate = false;
  #closed = false;
  /**
   * Settles when the source is closed, so that a read waiting in a batch is not waited for. One
   * per batch, never one for the source's life: each read races it, and every race leaves a
   * reaction on it until it settles — on a long-lived promise, one per message, for ever.
   */
  #batchEnd = Promise.withResolvers<IteratorResult<JsMsg>>();

  constructor(
    relay: JetStreamLog,
    target: RelayConsumerTarget,
    start: number | "beyond retention",
  ) {
    this.#relay = relay;
    this.#target = target;
    this.#stream = logName(target.stream);
    this.#name = consumerName(target.consumer);
    this.#expected = start;
  }

  async read(): Promise<OutgoingFrame | undefined> {
    if (this.#expected === "beyond retention") {
      throw new SourceClosed(CloseCode.BeyondRetention, beyondRetentionReason(this.#target.stream));
    }
    while (!this.#closed) {
      let result: IteratorResult<JsMsg>;
      try {
        if (this.#iterator === undefined) await this.#pull();
        result = await Promise.race([this.#iterator!.next(), this.#batchEnd.promise]);
      } catch (error) {
        if (this.#closed) break;
        this.#consumer = undefined;
        this.#iterator = undefined;
        if ((error as Error).name === "ConsumerNotFoundError") this.#recreate = true;
        // A pull that failed (missed heartbeats, a NATS reconnect): pull again; what it had in
        // flight is redelivered after the ack wait, and what was sent already is skipped.
        log.debug("relay.fetch_failed", "a relay consumer's pull failed; pulling again", {
          stream: this.#target.stream,
          consumer: this.#target.consumer,
          error: errorMessage(error),
        });
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      if (result.done) {
        this.#iterator = undefined; // the batch is over: the next read pulls another
        continue;
      }
      const message = result.value;
      const expected = this.#expected as number;
      // Sent on this socket already (a redelivery): not again.
      if (message.seq < expected) continue;
      if (message.seq > expected) {
        const { first_seq } = (await this.#relay.jsm.streams.info(this.#stream)).state;
        if (expected < first_seq) {
          // Retention dropped frames this consumer had not read: never skip them silently.
          throw new SourceClosed(
            CloseCode.BeyondRetention,
            beyondRetentionReason(this.#target.stream),
          );
        }
        // Frames lost on the way (a NATS reconnect): start the consumer again where we are.
        log.warn("relay.reposition", "a relay consumer missed frames in transit; resuming", {
          stream: this.#target.stream,
          consumer: this.#target.consumer,
          expected,
          got: message.seq,
        });
        this.#recreate = true;
        this.#iterator = undefined;
        void this.#messages?.close().catch(() => {});
        continue;
      }
      this.#expected = message.seq + 1;
      const text = message.string();
      const id = message.headers?.get("Nats-Msg-Id") ?? "";
      if (id.includes("+")) {
        // A chunk: its text's nextlsn is the publisher's last whole frame, acknowledged already
        // or sent on this socket; acking it confirms nothing new.
        const head = FRAME_HEAD.exec(text.slice(0, 40));
        const own = head === null ? ZERO_LSN : parseLsn(head[1]);
        return { text, nextLsn: own > this.#lastWhole ? own : this.#lastWhole, partial: true };
      }
      const lsn = parseLsn(id);
      this.#lastWhole = lsn;
      this.#pending.push({ lsn, message });
      return { text, nextLsn: lsn, partial: false };
    }
    return undefined;
  }

  /** The next batch, its durable consumer (re-)created first where it must be. */
  async #pull(): Promise<void> {
    if (this.#recreate) {
      this.#consumer = undefined;
      await reposition(this.#relay, this.#stream, this.#name, this.#expected as number);
      this.#pending.length = 0;
      this.#recreate = false;
    }
    // Looked up once (an info request to JetStream), and again only after a failure.
    this.#consumer ??= await this.#relay.js.consumers.get(this.#stream, this.#name);
    // Batches pulled one after another, each yielding its frames as they arrive.
    this.#messages = await this.#consumer.fetch({ max_messages: 256, expires: 5000 });
    this.#batchEnd = Promise.withResolvers();
    if (this.#closed) this.#batchEnd.resolve({ done: true, value: undefined });
    this.#iterator = this.#messages[Symbol.asyncIterator]();
  }

  acknowledge(lsn: Lsn): void {
    // "All" acknowledgement: the latest whole frame at or before lsn confirms every one before it.
    let last: JsMsg | undefined;
    while (this.#pending.length > 0 && this.#pending[0].lsn <= lsn) {
      last = this.#pending.shift()!.message;
    }
    last?.ack();
  }

  close(): Promise<void> {
    this.#closed = true;
    this.#batchEnd.resolve({ done: true, value: undefined });
    return this.#messages?.close().then(() => {}, () => {}) ?? Promise.resolve();
  }
}

/** An open relay consumer session: its stream, its lease's key, and its end (lease let go). */
export interface RelaySessionEntry {
  stream: string;
  key: string;
  ended: Promise<void>;
}

/**
 * Takes the consumer's lease (a {@link ConflictError} if it is connected
 * elsewhere), positions its durable consumer after its last
 * acknowledgement, and upgrades `request` to a consumer session of the
 * stream's log; a position older than the log closes with 4411.
 */
export async function acceptRelayConsumer(
  request: Request,
  relay: JetStreamLog,
  target: RelayConsumerTarget,
  sessions: Map<ConsumerSession, RelaySessionEntry>,
): Promise<Response> {
  const leaseKey = `${target.stream}.${target.consumer}`;
  // A reconnect right after a close here: its old session lets the lease go as it winds down.
  const previous = [...sessions].find(([session, open]) => open.key === leaseKey && session.ending);
  if (previous !== undefined) await deadlineFor(previous[1].ended, LEASE_TTL_MS);
  try {
    await relay.leases.create(leaseKey, target.instance);
  } catch {
    throw new ConflictError(
      `Cannot stream: consumer "${target.consumer}" of stream "${target.stream}" is connected ` +
        `elsewhere; one connection per consumer id (retry in ${LEASE_TTL_MS / 1000} s if it died)`,
    );
  }
  const renew = setInterval(
    () => void relay.leases.put(leaseKey, target.instance).catch(() => {}),
    LEASE_TTL_MS / 3,
  );
  let released: Promise<void> | undefined;
  const release = () => {
    clearInterval(renew);
    released ??= relay.leases.delete(leaseKey).then(() => {}, () => {});
    return released;
  };
  try {
    await relay.ensure(target.stream);
    const start = await position(relay, target);
    const { socket, response } = Deno.upgradeWebSocket(request);
    const label = `consumer "${target.consumer}" of stream "${target.stream}"`;
    const session = new ConsumerSession(socket, new LogSource(relay, target, start), {
      label,
      expiresAt: target.expiresAt,
    });
    // The session counts as ended once its lease is let go, so that a reconnect here can take it.
    const ended = session.done.finally(async () => {
      await release();
      sessions.delete(session);
    });
    sessions.set(session, { stream: target.stream, key: leaseKey, ended });
    const fields = { stream: target.stream, consumer: target.consumer };
    if (start === "beyond retention") {
      log.info("consumer.refused", "a relay consumer's position is older than its log", fields);
    } else {
      log.info("consumer.connected", `${label} connected`, { ...fields, fromSeq: start });
    }
    return response;
  } catch (error) {
    release();
    throw error;
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

/** Resolves when `promise` settles, or after `ms`, whichever comes first. */
async function deadlineFor(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    promise.catch(() => {}),
    new Promise((resolve) => (timer = setTimeout(resolve, ms))),
  ]);
  clearTimeout(timer);
}
