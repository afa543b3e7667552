/**
 * Relay mode (`NATS_URL`), composed: the instance's connection to NATS, its
 * publishers (one of the instances publishes each stream), and its
 * consumers and tails, which any instance serves from the streams' logs.
 * @module
 */

import { DeliverPolicy } from "@nats-io/jetstream";
import type { DatabaseConfig, RelayConfig } from "../config.ts";
import type { Metrics } from "../observability/metrics.ts";
import { CloseCode, type CloseCodeValue } from "../protocol.ts";
import type { StreamLog } from "../streams/stream_log.ts";
import type { PublishedStreams } from "./stream_publisher.ts";
import { sendToTail, type TailHub } from "../streams/tail_hub.ts";
import { JetStreamLog, logName, type LogState } from "./jetstream_log.ts";
import { acceptRelayConsumer, type RelaySessionEntry } from "./relay_session.ts";
import type { ConsumerSession } from "../streams/consumer_session.ts";
import { RelayPublishers } from "./stream_publisher.ts";

/** Relay mode: an instance's database connections are named this, then the instance's name. */
export const RELAY_APPLICATION_PREFIX = "pgdeltastream@";

/** The instance whose connection has `applicationName`, if it is one of ours. */
export function instanceOf(applicationName: string | null): string | null {
  return applicationName?.startsWith(RELAY_APPLICATION_PREFIX)
    ? applicationName.slice(RELAY_APPLICATION_PREFIX.length)
    : null;
}

/** What `GET /v2/streams/{name}` shows of a relayed stream. */
export interface RelayStateBody {
  /** The instance that publishes it (holds its slot), if any does. */
  publisher: string | null;
  log: Omit<LogState, "consumers"> | null;
  consumers: LogState["consumers"];
}

/** The relay of one instance. */
export class Relay implements StreamLog, AsyncDisposable {
  readonly config: RelayConfig;
  readonly log: JetStreamLog;
  readonly publishers: RelayPublishers;
  /** Open consumer sessions, with their stream and lease. */
  readonly #sessions = new Map<ConsumerSession, RelaySessionEntry>();
  /** The server's tails: relay tails are counted, expired and closed as direct ones are. */
  readonly #tails: TailHub;

  private constructor(
    config: RelayConfig,
    log: JetStreamLog,
    publishers: RelayPublishers,
    tails: TailHub,
  ) {
    this.config = config;
    this.log = log;
    this.publishers = publishers;
    this.#tails = tails;
  }

  /** Connects to NATS; the publishers start with {@link start}. */
  static async connect(
    config: RelayConfig,
    deps: {
      database: DatabaseConfig;
      streams: PublishedStreams;
      metrics?: Metrics;
      busyTimeoutSeconds: number;
      tails: TailHub;
    },
  ): Promise<Relay> {
    const log = await JetStreamLog.connect(config);
    const publishers = new RelayPublishers({ ...deps, log, instance: config.instance });
    return new Relay(config, log, publishers, deps.tails);
  }

  /** Starts trying to publish every stream. */
  start(): void {
    this.publishers.start();
  }

  /** Upgrades `request` to a consumer `consumer` of `stream`'s log. */
  acceptConsumer(
    request: Request,
    target: { stream: string; consumer: string; startSeq: number; expiresAt?: number },
  ): Promise<Response> {
    return acceptRelayConsumer(
      request,
      this.log,
      { ...target, instance: this.config.instance },
      this.#sessions,
    );
  }

  /** Upgrades `request` to a tail of `stream`: the log's new frames as they come, never acknowledged. */
  async acceptTail(request: Request, stream: string, expiresAt?: number): Promise<Response> {
    await this.log.ensure(stream);
    const consumer = await this.log.js.consumers.get(logName(stream), {
      deliver_policy: DeliverPolicy.New,
    });
    const { socket, response } = Deno.upgradeWebSocket(request);
    this.#tails.add(stream, socket, expiresAt);
    socket.addEventListener("open", async () => {
      const messages = await consumer.consume({ expires: 5000 });
      socket.addEventListener("close", () => void messages.close().catch(() => {}), { once: true });
      for await (const message of messages) {
        if (!sendToTail(socket, message.string())) break;
      }
    }, { once: true });
    return response;
  }

  /** Closes the consumers and tails of `stream` (every one, for no stream). */
  close(stream: string | undefined, code: CloseCodeValue, reason: string): void {
    for (const [session, entry] of this.#sessions) {
      if (stream === undefined || entry.stream === stream) session.close(code, reason);
    }
    if (stream === undefined) this.#tails.closeAll(code, reason);
    else this.#tails.close(stream, code, reason);
  }

  /** The stream was deleted: its consumers are told (4000), its log is deleted. */
  async deleted(stream: string): Promise<void> {
    this.close(stream, CloseCode.SlotDropped, "stream deleted");
    await this.log.delete(stream);
  }

  /** The stream was reset: its log is emptied; returns where the new slot's frames begin. */
  async reset(stream: string): Promise<number> {
    this.close(stream, CloseCode.SlotDropped, "stream reset");
    await this.log.ensure(stream);
    await this.log.purge(stream);
    return await this.log.lastSequence(stream) + 1;
  }

  /** Which instance publishes `stream` (`walsender`: its slot's connection's name), and its log's state. */
  async state(stream: string, walsender: string | null): Promise<RelayStateBody> {
    const publisher = instanceOf(walsender);
    const state = await this.log.state(stream, true);
    if (state === undefined) return { publisher, log: null, consumers: [] };
    const { consumers, ...rest } = state;
    return { publisher, log: rest, consumers };
  }

  /** Stops publishing, closes consumers (1001) and the connection to NATS. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close(undefined, CloseCode.GoingAway, "server shutting down");
    await this.publishers[Symbol.asyncDispose]();
    await this.log[Symbol.asyncDispose]();
  }
}
