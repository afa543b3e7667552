/**
 * The streams' logs on NATS JetStream: one JetStream stream per v2 stream
 * (`PGDS_<name>`, subject `pgds.<name>`, file storage, retention by age,
 * size and count), each message one transaction frame, its message id the
 * frame's position (`nextlsn`, or `<previous nextlsn>+<chunk>` for a
 * partial chunk) so that a re-publish is de-duplicated. Also the leases
 * that keep one connection per consumer id, in a key-value bucket whose
 * entries expire unless renewed.
 * @module
 */

import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  jetstream,
  type JetStreamClient,
  type JetStreamManager,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
} from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { RelayConfig } from "../config.ts";

/** The JetStream stream of the v2 stream `name`. */
export function logName(name: string): string {
  return `PGDS_${name}`;
}

/** The subject frames of the v2 stream `name` are published on. */
export function logSubject(name: string): string {
  return `pgds.${name}`;
}

/**
 * The header of a chunk (a partial frame) that says where the next frame of
 * its transaction starts: the ordinal after its last row change.
 */
export const END_CHANGE_HEADER = "Pgds-End-Change";

/** What a consumer id's durable consumer name starts with (tails' consumers have none). */
const CONSUMER_PREFIX = "c_";

/** A durable consumer's name for consumer id `id` (JetStream names allow no `.`, `*`, `>`). */
export function consumerName(id: string): string {
  return `${CONSUMER_PREFIX}${id}`;
}

/** How long a consumer's request to JetStream waits for an answer before it is sent again. */
const CONSUMER_REQUEST_TIMEOUT_MS = 2_000;

/** How long a reading of a stream's lease holders is shown again before it is read afresh. */
const LEASE_READ_MS = 5_000;

/** How long a consumer's lease lives without renewal: a crashed instance's consumers wait this long. */
export const LEASE_TTL_MS = 6_000;

/** What the API and the metrics show of a log. */
export interface LogState {
  messages: number;
  bytes: number;
  firstSeq: number;
  lastSeq: number;
  consumers: { id: string; pending: number; ackFloor: number; leasedBy: string | null }[];
}

/** The connection to NATS and what the relay keeps there. */
export class JetStreamLog implements AsyncDisposable {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  /**
   * Publishing has a connection of its own: on the shared one, publish acknowledgements queued
   * behind the deliveries to hundreds of consumers, and the log fell behind the database.
   */
  readonly publisher: JetStreamClient;
  readonly #publishing: NatsConnection;
  readonly jsm: JetStreamManager;
  readonly leases: KV;
  readonly #config: RelayConfig;
  readonly #ensured = new Set<string>();
  readonly #leaseReads = new Map<string, { at: number; holders: Promise<Map<string, string>> }>();

  private constructor(
    config: RelayConfig,
    nc: NatsConnection,
    publishing: NatsConnection,
    jsm: JetStreamManager,
    leases: KV,
  ) {
    this.#config = config;
    this.nc = nc;
    this.#publishing = publishing;
    this.publisher = jetstream(publishing, { timeout: 10_000 });
    this.jsm = jsm;
    // Consumers' requests (a consumer's info before a pull) give up sooner: one sent while NATS
    // elects a new leader gets no answer, and is better sent again than waited for.
    this.js = jetstream(nc, { timeout: CONSUMER_REQUEST_TIMEOUT_MS });
    this.leases = leases;
  }

  /** Connects to `config.servers` (reconnecting for ever) and opens the lease bucket. */
  static async connect(config: RelayConfig): Promise<JetStreamLog> {
    const options = (role: string) => ({
      servers: config.servers,
      name: `pgdeltastream-${config.instance}-${role}`,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
    });
    const nc = await connect(options("consumers"));
    let publishing: NatsConnection | undefined;
    try {
      publishing = await connect(options("publisher"));
      const jsm = await jetstreamManager(nc, { timeout: 10_000 });
      const leases = await new Kvm(nc).create("pgds_leases", {
        ttl: LEASE_TTL_MS,
        history: 1,
        replicas: config.replicas,
      });
      return new JetStreamLog(config, nc, publishing, jsm, leases);
    } catch (error) {
      await nc.close();
      await publishing?.close();
      throw error;
    }
  }

  /** Creates the log of stream `name` if it does not exist. */
  async ensure(name: string): Promise<void> {
    if (this.#ensured.has(name)) return;
    const config = {
      name: logName(name),
      subjects: [logSubject(name)],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      max_age: this.#config.maxAgeSeconds * 1e9,
      max_bytes: this.#config.maxBytes,
      max_msgs: this.#config.maxMessages > 0 ? this.#config.maxMessages : -1,
      duplicate_window: 120e9,
      num_replicas: this.#config.replicas,
    };
    try {
      await this.jsm.streams.info(config.name);
      await this.jsm.streams.update(config.name, config);
    } catch {
      await this.jsm.streams.add(config);
    }
    this.#ensured.add(name);
  }

  /** Empties the log of `name` (after a reset: what it held belongs to the old slot). */
  async purge(name: string): Promise<void> {
    await this.jsm.streams.purge(logName(name)).catch(() => {});
  }

  /** Deletes the log of `name` and its consumers. */
  async delete(name: string): Promise<void> {
    this.#ensured.delete(name);
    this.#leaseReads.delete(name);
    await this.jsm.streams.delete(logName(name)).catch(() => {});
  }

  /**
   * The log's last frame (where a new publisher resumes): its message id and,
   * for a chunk, the {@link END_CHANGE_HEADER} it carries; none for an empty log.
   */
  async lastFrame(name: string): Promise<{ id: string; endChange?: number } | undefined> {
    try {
      const message = await this.jsm.streams.getMessage(logName(name), {
        last_by_subj: logSubject(name),
      });
      const id = message?.header.get("Nats-Msg-Id");
      if (!id) return undefined;
      const end = message!.header.get(END_CHANGE_HEADER);
      return { id, ...(end ? { endChange: Number(end) } : {}) };
    } catch {
      return undefined;
    }
  }

  /** The sequence of the log's last message (0 for a log never written). */
  async lastSequence(name: string): Promise<number> {
    return (await this.jsm.streams.info(logName(name))).state.last_seq;
  }

  /**
   * Size and positions of the log of `name`, and its consumers' standing; none if there is no log.
   * Who holds each consumer's lease is read (one KV get each, at once) only `withLeases`: the API
   * shows it, a metrics scrape does not pay for it.
   */
  async state(name: string, withLeases = false): Promise<LogState | undefined> {
    try {
      const info = await this.jsm.streams.info(logName(name));
      const consumers: LogState["consumers"] = [];
      for await (const c of this.jsm.consumers.list(logName(name))) {
        if (!c.name.startsWith(CONSUMER_PREFIX)) continue;
        consumers.push({
          id: c.name.slice(CONSUMER_PREFIX.length),
          pending: c.num_pending + c.num_ack_pending,
          ackFloor: c.ack_floor.stream_seq,
          leasedBy: null,
        });
      }
      if (withLeases) {
        const holders = await this.#leaseHolders(name, consumers.map((c) => c.id));
        for (const consumer of consumers) consumer.leasedBy = holders.get(consumer.id) ?? null;
      }
      return {
        messages: info.state.messages,
        bytes: info.state.bytes,
        firstSeq: info.state.first_seq,
        lastSeq: info.state.last_seq,
        consumers,
      };
    } catch {
      return undefined;
    }
  }

  /**
   * Who holds each of `ids`' leases on `name`, read (one KV get each, at once) at most every
   * {@link LEASE_READ_MS}: a stream's state asked for often (a console, a poll) must not cost
   * NATS and this instance a request per consumer each time.
   */
  #leaseHolders(name: string, ids: string[]): Promise<Map<string, string>> {
    const cached = this.#leaseReads.get(name);
    if (cached !== undefined && performance.now() - cached.at < LEASE_READ_MS) {
      return cached.holders;
    }
    const holders = (async () => {
      const found = new Map<string, string>();
      await Promise.all(ids.map(async (id) => {
        const lease = await this.leases.get(`${name}.${id}`).catch(() => null);
        if (lease?.operation === "PUT") found.set(id, lease.string());
      }));
      return found;
    })();
    this.#leaseReads.set(name, { at: performance.now(), holders });
    return holders;
  }

  /** Closes the connection (after flushing what was published). */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.#publishing.drain().catch(() => this.#publishing.close());
    await this.nc.drain().catch(() => this.nc.close());
  }
}
