/**
 * Relay mode's replicators: in every instance, one loop per v2 stream tries
 * to become the stream's publisher — it takes the stream's advisory lock
 * (held on the instance's lock connection, so a dead instance lets go at
 * once) and then its slot (PostgreSQL allows one reader) — and, while it
 * holds both, publishes each frame to the stream's JetStream log. A
 * position is confirmed to PostgreSQL only once JetStream acknowledged
 * every frame up to it, so the slot follows the log. A new publisher
 * starts after the log's last frame: frames decoded again from the slot's
 * confirmed position that the log already has are skipped, and a large
 * transaction whose first chunks are in the log resumes after them, by its
 * change ordinal (so whatever chunk size either publisher had); a publish
 * retried after a timeout is de-duplicated by its message id.
 *
 * A message's id names its content across publishers and instances: a whole
 * frame's is its `nextlsn`; a chunk's is `<its transaction's commit record
 * position>+<ordinal of its first row change>`, with the ordinal after its
 * last in {@link END_CHANGE_HEADER}.
 * @module
 */

import type pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { formatLsn, type Lsn, parseLsn } from "../lsn.ts";
import { errorMessage, log } from "../observability/log.ts";
import type { Metrics } from "../observability/metrics.ts";
import { connect } from "../postgres/database.ts";
import type { Frame } from "../replication/pgoutput_decoder.ts";
import {
  type ReplicationOptions,
  type ReplicationService,
  startReplication,
} from "../replication/replication_service.ts";
import type { StoredStream } from "../streams/stream_store.ts";
import { headers } from "@nats-io/transport-node";
import { END_CHANGE_HEADER, type JetStreamLog, logSubject } from "./jetstream_log.ts";

/** Frames published and not yet acknowledged by JetStream, at most. */
const IN_FLIGHT = 512;
/**
 * How long a publish waits for JetStream's acknowledgement before it is sent again. Shorter waits
 * (1.5 s) shortened a NATS leader election's outage by about a second, but under a saturated NATS
 * (bench P5) they time out and re-send, costing a quarter more CPU: 5 s it stays.
 */
const PUBLISH_TIMEOUT_MS = 5000;
/** Publishes retried after a timeout (same message id: JetStream de-duplicates), at most. */
const PUBLISH_ATTEMPTS = 5;

/**
 * A frame's position in its log: `[nextlsn, -1]` for a whole frame (the end
 * of its commit record), `[start of its commit record, first change]` for a
 * chunk. Ordered as the log is: a transaction's chunks come after the frames
 * of every transaction that committed before it, and before its last frame.
 */
type Position = [Lsn, number];

/** The position of the message id `id` (`X/Y` or `X/Y+k`). */
function positionOf(id: string): Position {
  const [lsn, chunk] = id.split("+");
  return [parseLsn(lsn), chunk === undefined ? -1 : Number(chunk)];
}

/** The message id of `frame`: see the module's documentation. */
function messageId(frame: Frame): string {
  return frame.partial
    ? `${formatLsn(frame.txLsn)}+${frame.firstChange}`
    : formatLsn(frame.nextLsn);
}

function after(a: Position, b: Position): boolean {
  return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
}

/** What publishing needs of the streams: which there are, and how each is replicated. */
export interface PublishedStreams {
  listStored(): Promise<StoredStream[]>;
  /** The stored stream `name` (rejects when there is none). */
  require(name: string): Promise<StoredStream>;
  replicationPlan(stream: StoredStream): Promise<{ options: ReplicationOptions }>;
}

/** What publishing needs. */
export interface PublisherDependencies {
  database: DatabaseConfig;
  log: JetStreamLog;
  streams: PublishedStreams;
  metrics?: Metrics;
  instance: string;
  busyTimeoutSeconds: number;
}

/** Every stream's publisher loop in this instance. */
export class RelayPublishers implements AsyncDisposable {
  readonly #deps: PublisherDependencies;
  readonly #takeoverMs: number;
  readonly #running = new Map<string, Promise<void>>();
  readonly #publishing = new Set<string>();
  readonly #abort = new AbortController();
  #lock: pg.Client | undefined;
  #loop: Promise<void> = Promise.resolve();

  /** Publishers of `deps.streams`, each trying to take over every `takeoverMs`. */
  constructor(deps: PublisherDependencies, takeoverMs = 1000) {
    this.#deps = deps;
    this.#takeoverMs = takeoverMs;
  }

  /** Whether this instance publishes `stream` now. */
  publishes(stream: string): boolean {
    return this.#publishing.has(stream);
  }

  /** Starts the loops: streams created later are picked up within `takeoverMs`. */
  start(): void {
    this.#loop = this.#supervise();
  }

  async #supervise(): Promise<void> {
    const signal = this.#abort.signal;
    while (!signal.aborted) {
      try {
        const lock = await this.#lockConnection();
        for (const stream of await this.#deps.streams.listStored()) {
          if (stream.invalidated !== null || this.#running.has(stream.name)) continue;
          const run = this.#publish(stream.name, lock).finally(() =>
            this.#running.delete(stream.name)
          );
          this.#running.set(stream.name, run);
        }
      } catch (error) {
        if (!signal.aborted) {
          log.warn("relay.supervisor", "the relay's publishers could not check the streams", {
            error: errorMessage(error),
          });
        }
      }
      await sleep(this.#takeoverMs, signal);
    }
  }

  /** The instance's connection holding its publishers' advisory locks. */
  async #lockConnection(): Promise<pg.Client> {
    if (this.#lock !== undefined) return this.#lock;
    const client = await connect(this.#deps.database);
    client.on("error", () => {
      // The connection is gone, and with it every lock: the next round takes them again.
      if (this.#lock === client) this.#lock = undefined;
    });
    this.#lock = client;
    return client;
  }

  /** Tries once to take `name` over; publishes until it loses the slot, the lock or stops. */
  async #publish(name: string, lock: pg.Client): Promise<void> {
    const key = `pgdeltastream.publish.${name}`;
    const { rows: [{ locked }] } = await lock.query<{ locked: boolean }>(
      "SELECT pg_try_advisory_lock(hashtext($1)) AS locked",
      [key],
    ).catch(() => ({ rows: [{ locked: false }] }));
    if (!locked) return;
    let service: ReplicationService | undefined;
    try {
      const stream = await this.#deps.streams.require(name).catch(() => undefined);
      if (stream === undefined || stream.invalidated !== null) return;
      await this.#deps.log.ensure(name);
      const plan = await this.#deps.streams.replicationPlan(stream);
      // Where the log ends: a transaction whose first chunks it has goes on after them.
      const last = await this.#deps.log.lastFrame(name);
      const lastPosition = last === undefined ? undefined : positionOf(last.id);
      if (lastPosition !== undefined && lastPosition[1] >= 0 && last!.endChange !== undefined) {
        plan.options.resume = { txLsn: lastPosition[0], changes: last!.endChange };
      }
      // NATS refuses messages over its max_payload: keep chunks well under it.
      const maxPayload = this.#deps.log.nc.info?.max_payload ?? 1 << 20;
      plan.options.chunkBytes = Math.min(
        plan.options.chunkBytes ?? 1 << 20,
        Math.floor(maxPayload / 2),
      );
      service = await startReplication(plan.options, this.#deps.busyTimeoutSeconds);
      this.#publishing.add(name);
      log.info("relay.publishing", `this instance publishes stream "${name}" to its log`, {
        stream: name,
        instance: this.#deps.instance,
        slot: stream.slotName,
      });
      await this.#pump(name, service, last?.id);
    } catch (error) {
      if (!this.#abort.signal.aborted) {
        log.warn("relay.publisher_stopped", `publishing stream "${name}" stopped; retrying`, {
          stream: name,
          error: errorMessage(error),
        });
      }
    } finally {
      this.#publishing.delete(name);
      await service?.close();
      await lock.query("SELECT pg_advisory_unlock(hashtext($1))", [key]).catch(() => {});
    }
  }

  /** Publishes every frame of `service` in order, confirming each transaction once JetStream has it. */
  async #pump(
    name: string,
    service: ReplicationService,
    lastId: string | undefined,
  ): Promise<void> {
    const { log: relayLog } = this.#deps;
    const subject = logSubject(name);
    let last = lastId === undefined ? undefined : positionOf(lastId);
    // Each publish expects the one before it to be the log's last: a frame lost in transit makes
    // the next ones fail instead of leaving a gap; the publisher then starts again after the log.
    let expected: Expectation = lastId === undefined
      ? { lastSequence: await relayLog.lastSequence(name) }
      : { lastMsgID: lastId };
    const metrics = this.#deps.metrics?.session(name);
    const inFlight: { done: boolean; final?: Lsn; error?: unknown }[] = [];
    let failure: unknown;
    let wake: (() => void) | undefined;
    const reader = service.readable.getReader();
    const stop = () => void reader.cancel().catch(() => {});
    const settle = () => {
      while (inFlight.length > 0 && inFlight[0].done) {
        const head = inFlight.shift()!;
        if (head.error !== undefined && failure === undefined) {
          failure = head.error;
          // The pump may be waiting for the slot's next frame, which may never come (nothing
          // more is written): stop reading, so that the publisher starts again after the log now.
          stop();
        } else if (head.final !== undefined && failure === undefined) {
          service.acknowledge(head.final);
        }
      }
      wake?.();
    };
    this.#abort.signal.addEventListener("abort", stop, { once: true });
    try {
      for (;;) {
        if (failure !== undefined) throw failure;
        const result = await reader.read();
        if (failure !== undefined) throw failure;
        if (result.done) return;
        const frame: Frame = result.value;
        const position: Position = frame.partial
          ? [frame.txLsn, frame.firstChange]
          : [frame.nextLsn, -1];
        const id = messageId(frame);
        const entry: (typeof inFlight)[number] = {
          done: false,
          final: frame.partial ? undefined : frame.nextLsn,
        };
        inFlight.push(entry);
        if (last !== undefined) {
          if (!after(position, last)) {
            // The log has it already (a previous publisher's): only confirm it again.
            entry.done = true;
            settle();
            continue;
          }
          last = undefined; // frames come in order: every later one is after the log's too
        }
        const expect = expected;
        expected = { lastMsgID: id };
        void publish(relayLog, subject, frame, id, expect).then(
          () => {
            metrics?.sent?.(frame);
            entry.done = true;
            settle();
          },
          (error) => {
            entry.error = error;
            entry.done = true;
            settle();
          },
        );
        while (inFlight.length >= IN_FLIGHT && failure === undefined) {
          await new Promise<void>((resolve) => (wake = resolve));
        }
      }
    } finally {
      this.#abort.signal.removeEventListener("abort", stop);
      metrics?.ended();
    }
  }

  /** Stops every publisher and lets go of their slots and locks. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#abort.abort();
    await this.#loop;
    await Promise.all(this.#running.values());
    await this.#lock?.end().catch(() => {});
  }
}

/** What a publish expects the log's last message to be. */
type Expectation = { lastMsgID: string } | { lastSequence: number };

/**
 * Publishes with `id` if the log's last message is as `expect` says,
 * retrying a timed-out publish (JetStream drops the duplicate if it had it;
 * a refused expectation is not retried).
 */
async function publish(
  log: JetStreamLog,
  subject: string,
  frame: Frame,
  id: string,
  expect: Expectation,
): Promise<void> {
  let chunk: ReturnType<typeof headers> | undefined;
  if (frame.partial) {
    chunk = headers();
    chunk.set(END_CHANGE_HEADER, String(frame.endChange));
  }
  for (let attempt = 1;; attempt++) {
    try {
      await log.publisher.publish(subject, frame.text, {
        msgID: id,
        timeout: PUBLISH_TIMEOUT_MS,
        expect,
        ...(chunk === undefined ? {} : { headers: chunk }),
      });
      return;
    } catch (error) {
      if (attempt >= PUBLISH_ATTEMPTS || /wrong last/i.test(errorMessage(error))) throw error;
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
    }
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });
}
