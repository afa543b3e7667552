/**
 * Prometheus metrics, from `npm:prom-client`: per stream (`stream` is the v2
 * stream's name, `v1` for v1 slots) what was sent, acknowledged and sent
 * again, how far behind the slot is, how long a commit took to reach the
 * socket; per route the HTTP answers; and the process's own metrics.
 *
 * The hot path pays per frame, never per change: a session binds its
 * labelled children once, and each frame adds to a few counters. Lag and
 * tail counts are read when Prometheus scrapes, not kept up to date.
 * @module
 */

import process from "node:process";
import client from "prom-client";
import type { Lsn } from "../lsn.ts";
import type { HistorySample, MetricHistoryBody, StreamSample } from "../protocol.ts";

/** The label value of v1 slots. */
export const V1_STREAM_LABEL = "v1";

/** What the metrics read when scraped. */
export interface MetricSources {
  /** Each stream's slot lag in bytes (null when its slot is gone), by stream label. */
  lag(): Promise<Map<string, number | null>>;
  /** Read-only tails, by stream. */
  tails(): Map<string, number>;
  /** Relay mode: each stream's log, whether this instance publishes it, its consumers' pending. */
  relay?(): Promise<RelayReading[]>;
  /** Backfills not finished, by stream and state (`queued`, `running`, `cancelling`). */
  backfills?(): Promise<{ stream: string; state: string; count: number }[]>;
}

/** What the metrics show of one relayed stream. */
export interface RelayReading {
  stream: string;
  publishing: boolean;
  messages: number;
  bytes: number;
  firstSeq: number;
  lastSeq: number;
  consumers: { id: string; pending: number }[];
}

/** What the metrics count of a frame sent: its text and position, and its changes and commit time. */
export interface SentFrame {
  text: string;
  nextLsn: Lsn;
  partial: boolean;
  /** UTF-8 bytes of `text`, where known without counting. */
  bytes?: number;
  changes?: number;
  commitTime?: number;
}

/** A session's view of the metrics: what it sent and had acknowledged, and its end. */
export interface SessionMetrics {
  /** A frame was written to the consumer's socket (or, relay mode, to the log). */
  sent(frame: SentFrame): void;
  /** The consumer acknowledged a position. */
  acknowledged(lsn: Lsn): void;
  /** The session ended. */
  ended(): void;
}

/** Seconds from commit to socket: sub-millisecond to a minute. */
const LATENCY_BUCKETS = [
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
];

/**
 * The process metrics Prometheus' clients share (`process_cpu_*`, resident memory, start time)
 * and the runtime's heap, from Deno's own APIs. prom-client's `collectDefaultMetrics` is not
 * used: under Deno its `/proc/self` readers need `--allow-all`, and with its event-loop and GC
 * monitors running a graceful shutdown under a stalled export did not complete.
 */
function processMetrics(registers: client.Registry[]): void {
  const started = Date.now() / 1000 - performance.now() / 1000;
  const cpu = (name: string, help: string, seconds: () => number) =>
    new client.Counter({
      name,
      help,
      registers,
      collect() {
        this.reset();
        this.inc(seconds());
      },
    });
  cpu(
    "process_cpu_user_seconds_total",
    "Total user CPU time spent in seconds.",
    () => process.cpuUsage().user / 1e6,
  );
  cpu(
    "process_cpu_system_seconds_total",
    "Total system CPU time spent in seconds.",
    () => process.cpuUsage().system / 1e6,
  );
  cpu("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", () => {
    const usage = process.cpuUsage();
    return (usage.user + usage.system) / 1e6;
  });
  new client.Gauge({
    name: "process_start_time_seconds",
    help: "Start time of the process since unix epoch in seconds.",
    registers,
    collect() {
      this.set(Math.round(started));
    },
  });
  const memory = (name: string, help: string, field: keyof Deno.MemoryUsage) =>
    new client.Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(Deno.memoryUsage()[field]);
      },
    });
  memory("process_resident_memory_bytes", "Resident memory size in bytes.", "rss");
  memory("nodejs_heap_size_total_bytes", "Runtime heap size in bytes.", "heapTotal");
  memory("nodejs_heap_size_used_bytes", "Runtime heap size used in bytes.", "heapUsed");
  memory("nodejs_external_memory_bytes", "Runtime external memory size in bytes.", "external");
}

/** Outside printable ASCII (JSON text has no raw control characters). */
const NON_ASCII = /[^ -~]/;
const encoder = new TextEncoder();

/** UTF-8 length of `text`; its length when it is ASCII, which frames nearly always are. */
function utf8Bytes(text: string): number {
  return !NON_ASCII.test(text) ? text.length : encoder.encode(text).length;
}

/** A stream's counts since the process started, and latencies (ms) not scraped yet. */
interface Tally {
  frames: number;
  changes: number;
  bytes: number;
  acks: number;
  redelivered: number;
  latencies: number[];
  /** Latencies (ms) since the last history sample. */
  recent: number[];
  /** `changes` and `bytes` at the last history sample. */
  sampled: { changes: number; bytes: number };
}

/**
 * A connected consumer: since when, and a coarse record of what it was sent
 * and has not acknowledged (a frame's position and commit time, at most one
 * per {@link UNACKED_STEP_MS}): the first entry is the oldest unacknowledged.
 */
interface Consumer {
  connectedAt: Date;
  unacked: { lsn: Lsn; commitTime: number }[];
  head: number;
  lastRecorded: number;
}

/** How often a consumer's unacknowledged frames are recorded, at most. */
const UNACKED_STEP_MS = 100;
/** Unacknowledged frames recorded per consumer, at most (beyond: its age is not less than told). */
const MAX_UNACKED_RECORDS = 10_000;
/** Latencies kept per stream between history samples, at most. */
const MAX_RECENT_LATENCIES = 100_000;
/** History kept: 15 minutes of samples at the default interval. */
export const HISTORY_SECONDS = 15 * 60;

/** The `q` quantile (0–1) of `sorted`, which is ascending and not empty. */
function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

/** Latencies kept between scrapes, at most (beyond them, until the next scrape, none are). */
const MAX_UNSCRAPED_LATENCIES = 1_000_000;

/** The server's metrics registry. */
export class Metrics {
  /** The registry `/metrics` exposes. */
  readonly registry: client.Registry = new client.Registry();
  readonly #connected: client.Gauge<"stream">;
  /** Per stream: what its sessions sent and had acknowledged, read when scraped. */
  readonly #tallies = new Map<string, Tally>();
  readonly #snapshotRows: client.Counter<"stream">;
  readonly #backfillRows: client.Counter<"stream">;
  readonly #http: client.Counter<"route" | "method" | "status">;
  readonly #limitRatio: client.Gauge<"stream" | "limit">;
  readonly #invalidated: client.Gauge<"stream">;
  readonly #invalidations: client.Counter<"stream">;
  /** The highest nextlsn sent per stream in this process: a frame at or below it is sent again. */
  readonly #highest = new Map<string, Lsn>();
  /** Consumers connected to this instance, per stream. */
  readonly #consumers = new Map<string, Set<Consumer>>();
  readonly #sources: MetricSources;
  readonly #history: HistorySample[] = [];
  readonly #historyIntervalMs: number;
  #lastSample = performance.now();

  /**
   * Metrics whose scrape-time values come from `sources`; the history of
   * {@link sample} keeps 15 minutes of samples taken every `historyIntervalMs`.
   */
  constructor(sources: MetricSources, historyIntervalMs = 5000) {
    this.#sources = sources;
    this.#historyIntervalMs = historyIntervalMs;
    const registers = [this.registry];
    const stream = ["stream"] as const;
    // One reading of the slots per scrape, for every metric that needs it (they collect at once).
    let reading: Promise<Map<string, number | null>> | undefined;
    const lags = () =>
      reading ??= sources.lag().finally(() => setTimeout(() => (reading = undefined), 0));
    new client.Gauge({
      name: "pgdeltastream_stream_lag_bytes",
      help: "WAL between the database's current position and the stream's confirmed position",
      labelNames: stream,
      registers,
      async collect() {
        this.reset();
        for (const [name, lag] of await lags()) {
          if (lag !== null) this.set({ stream: name }, lag);
        }
      },
    });
    this.#connected = new client.Gauge({
      name: "pgdeltastream_stream_connected",
      help: "1 while a consumer is connected to the stream",
      labelNames: stream,
      registers,
      async collect() {
        // Every stream has the series, 0 until a consumer connects (an absent one alerts nobody).
        for (const name of (await lags().catch(() => new Map())).keys()) {
          this.inc({ stream: name }, 0);
        }
      },
    });
    new client.Gauge({
      name: "pgdeltastream_tail_clients",
      help: "Read-only tails watching the stream",
      labelNames: stream,
      registers,
      collect() {
        this.reset();
        for (const [name, count] of sources.tails()) this.set({ stream: name }, count);
      },
    });
    const counter = (name: string, help: string) =>
      new client.Counter({ name, help, labelNames: stream, registers });
    // What sessions count per frame is kept in plain fields (the hot path pays an addition, not a
    // label lookup), and handed to prom-client when it is scraped.
    const tallies = this.#tallies;
    const tallied = (
      name: string,
      help: string,
      field: keyof Omit<Tally, "latencies" | "recent" | "sampled">,
    ) =>
      new client.Counter({
        name,
        help,
        labelNames: stream,
        registers,
        collect() {
          this.reset();
          for (const [name, tally] of tallies) this.inc({ stream: name }, tally[field]);
        },
      });
    tallied("pgdeltastream_frames_sent_total", "Transaction frames sent", "frames");
    tallied("pgdeltastream_changes_sent_total", "Changes sent, in frames", "changes");
    tallied("pgdeltastream_bytes_sent_total", "UTF-8 bytes of the frames sent", "bytes");
    tallied("pgdeltastream_acks_total", "Acknowledgements that moved a position", "acks");
    tallied(
      "pgdeltastream_redelivered_frames_total",
      "Frames sent again after a reconnect (this process's memory of what it sent)",
      "redelivered",
    );
    this.#snapshotRows = counter("pgdeltastream_snapshot_rows_total", "Snapshot rows returned");
    this.#backfillRows = counter(
      "pgdeltastream_backfill_rows_total",
      "Backfill rows sent in frames (a chunk sent again counts again)",
    );
    if (sources.backfills !== undefined) {
      const backfills = sources.backfills;
      new client.Gauge({
        name: "pgdeltastream_backfill_active",
        help: "Backfills not finished, by state: queued, running, cancelling",
        labelNames: ["stream", "state"] as const,
        registers,
        async collect() {
          this.reset();
          // Every stream has its queued and running series, 0 while it has none.
          for (const name of (await lags().catch(() => new Map())).keys()) {
            for (const state of ["queued", "running"]) this.set({ stream: name, state }, 0);
          }
          for (const { stream, state, count } of await backfills()) {
            this.inc({ stream, state }, count);
          }
        },
      });
    }
    new client.Histogram({
      name: "pgdeltastream_commit_to_send_seconds",
      help: "From the transaction's commit timestamp to the frame's write on the socket",
      labelNames: stream,
      buckets: LATENCY_BUCKETS,
      registers,
      collect() {
        for (const [name, tally] of tallies) {
          for (const ms of tally.latencies) this.observe({ stream: name }, ms / 1000);
          tally.latencies.length = 0;
        }
      },
    });
    this.#http = new client.Counter({
      name: "pgdeltastream_http_requests_total",
      help: "HTTP requests answered, by route pattern, method and status",
      labelNames: ["route", "method", "status"] as const,
      registers,
    });
    this.#limitRatio = new client.Gauge({
      name: "pgdeltastream_stream_limit_ratio",
      help: "Share of the stream's limit used: lag_bytes (WAL held) or idle_seconds; 1 invalidates",
      labelNames: ["stream", "limit"] as const,
      registers,
    });
    this.#invalidated = new client.Gauge({
      name: "pgdeltastream_stream_invalidated",
      help: "1 while the stream is invalidated (its slot dropped; reset it)",
      labelNames: stream,
      registers,
    });
    this.#invalidations = counter(
      "pgdeltastream_stream_invalidations_total",
      "Streams (v1: slots) the WAL guard invalidated",
    );
    if (sources.relay !== undefined) this.#relayMetrics(sources.relay, registers);
    processMetrics(registers);
  }

  /** Relay gauges, all read by the first one's collect (registered first, so collected first). */
  #relayMetrics(read: () => Promise<RelayReading[]>, registers: client.Registry[]): void {
    const gauge = (name: string, help: string, labelNames: string[] = ["stream"]) =>
      new client.Gauge({ name, help, labelNames, registers });
    const publisher = gauge(
      "pgdeltastream_relay_publisher",
      "1 while this instance publishes the stream to its log",
    );
    const bytes = gauge("pgdeltastream_relay_log_bytes", "Bytes in the stream's log");
    const first = gauge("pgdeltastream_relay_log_first_seq", "First sequence in the stream's log");
    const last = gauge("pgdeltastream_relay_log_last_seq", "Last sequence in the stream's log");
    const pending = gauge(
      "pgdeltastream_relay_consumer_pending",
      "Frames of the log a consumer has not acknowledged",
      ["stream", "consumer"],
    );
    new client.Gauge({
      name: "pgdeltastream_relay_log_messages",
      help: "Frames in the stream's log",
      labelNames: ["stream"],
      registers,
      async collect() {
        const readings = await read().catch(() => []);
        for (const g of [this, publisher, bytes, first, last, pending]) g.reset();
        for (const r of readings) {
          const stream = { stream: r.stream };
          this.set(stream, r.messages);
          publisher.set(stream, r.publishing ? 1 : 0);
          bytes.set(stream, r.bytes);
          first.set(stream, r.firstSeq);
          last.set(stream, r.lastSeq);
          for (const c of r.consumers) pending.set({ stream: r.stream, consumer: c.id }, c.pending);
        }
      },
    });
  }

  /** Counts the frames, changes, bytes and acks of a session of `stream`, and its connection. */
  session(stream: string): SessionMetrics {
    let tally = this.#tallies.get(stream);
    if (tally === undefined) {
      tally = {
        frames: 0,
        changes: 0,
        bytes: 0,
        acks: 0,
        redelivered: 0,
        latencies: [],
        recent: [],
        sampled: { changes: 0, bytes: 0 },
      };
      this.#tallies.set(stream, tally);
    }
    const t = tally;
    const connected = this.#connected.labels({ stream });
    const highest = this.#highest;
    connected.inc();
    const consumer: Consumer = { connectedAt: new Date(), unacked: [], head: 0, lastRecorded: 0 };
    const registry = this.#consumers;
    const consumers = registry.get(stream) ?? new Set();
    registry.set(stream, consumers.add(consumer));
    return {
      sent(frame: SentFrame) {
        t.frames++;
        t.changes += frame.changes ?? 0;
        t.bytes += frame.bytes ?? utf8Bytes(frame.text);
        const top = highest.get(stream) ?? 0n;
        // A partial chunk carries the previous transaction's nextlsn: only below the top is it a repeat.
        if (frame.partial ? frame.nextLsn < top : frame.nextLsn <= top) t.redelivered++;
        else if (!frame.partial) highest.set(stream, frame.nextLsn);
        if (frame.commitTime === undefined) return;
        const now = Date.now();
        const ms = Math.max(0, now - frame.commitTime);
        if (t.latencies.length < MAX_UNSCRAPED_LATENCIES) t.latencies.push(ms);
        if (t.recent.length < MAX_RECENT_LATENCIES) t.recent.push(ms);
        const pending = consumer.unacked.length - consumer.head;
        if (
          (pending === 0 || now - consumer.lastRecorded >= UNACKED_STEP_MS) &&
          pending < MAX_UNACKED_RECORDS
        ) {
          consumer.unacked.push({ lsn: frame.nextLsn, commitTime: frame.commitTime });
          consumer.lastRecorded = now;
        }
      },
      acknowledged(lsn: Lsn) {
        t.acks++;
        const records = consumer.unacked;
        while (consumer.head < records.length && records[consumer.head].lsn <= lsn) consumer.head++;
        if (consumer.head === records.length) {
          records.length = 0;
          consumer.head = 0;
        } else if (consumer.head > 1024) {
          records.splice(0, consumer.head);
          consumer.head = 0;
        }
      },
      ended() {
        connected.dec();
        consumers.delete(consumer);
        if (consumers.size === 0) registry.delete(stream);
      },
    };
  }

  /**
   * The consumer of `stream` this instance serves (of several, the longest
   * connected, and the oldest unacknowledged age among them), if any.
   */
  consumerOf(stream: string): { connectedAt: string; unackedSeconds: number } | undefined {
    const consumers = [...this.#consumers.get(stream) ?? []];
    if (consumers.length === 0) return undefined;
    const now = Date.now();
    const since = Math.min(...consumers.map((c) => c.connectedAt.getTime()));
    const oldest = Math.min(
      ...consumers.map((c) => c.unacked[c.head]?.commitTime ?? now),
    );
    return {
      connectedAt: new Date(since).toISOString(),
      unackedSeconds: Math.max(0, now - oldest) / 1000,
    };
  }

  /**
   * Adds a sample to the history: each stream's lag now, and its changes and
   * bytes per second and commit-to-socket p50/p99 since the previous sample.
   */
  async sample(): Promise<void> {
    const lags = await this.#sources.lag().catch(() => new Map<string, number | null>());
    const now = performance.now();
    const seconds = Math.max(0.001, (now - this.#lastSample) / 1000);
    this.#lastSample = now;
    const streams: Record<string, StreamSample> = {};
    const names = new Set([...lags.keys(), ...this.#tallies.keys()]);
    for (const name of names) {
      const t = this.#tallies.get(name);
      const sorted = t === undefined ? [] : t.recent.sort((a, b) => a - b);
      streams[name] = {
        lagBytes: lags.get(name) ?? null,
        changesPerSecond: t === undefined ? 0 : (t.changes - t.sampled.changes) / seconds,
        bytesPerSecond: t === undefined ? 0 : (t.bytes - t.sampled.bytes) / seconds,
        latencyP50Ms: sorted.length === 0 ? null : quantile(sorted, 0.5),
        latencyP99Ms: sorted.length === 0 ? null : quantile(sorted, 0.99),
      };
      if (t !== undefined) {
        t.sampled = { changes: t.changes, bytes: t.bytes };
        t.recent = [];
      }
    }
    this.#history.push({ time: new Date().toISOString(), streams });
    const keep = Math.max(1, Math.ceil(HISTORY_SECONDS * 1000 / this.#historyIntervalMs));
    if (this.#history.length > keep) this.#history.splice(0, this.#history.length - keep);
  }

  /** The history: the last 15 minutes of samples, oldest first. */
  history(): MetricHistoryBody {
    return { intervalSeconds: this.#historyIntervalMs / 1000, samples: [...this.#history] };
  }

  /** The WAL guard's latest reading of `stream`. */
  limits(stream: string, lagRatio: number, idleRatio: number, invalidated: boolean): void {
    this.#limitRatio.set({ stream, limit: "lag_bytes" }, lagRatio);
    this.#limitRatio.set({ stream, limit: "idle_seconds" }, idleRatio);
    this.#invalidated.set({ stream }, invalidated ? 1 : 0);
  }

  /** The WAL guard invalidated `stream`. */
  invalidated(stream: string): void {
    this.#invalidations.inc({ stream });
    this.#invalidated.set({ stream }, 1);
  }

  /** `rows` snapshot rows of `stream` were returned. */
  snapshotRows(stream: string, rows: number): void {
    if (rows > 0) this.#snapshotRows.inc({ stream }, rows);
  }

  /** `rows` backfill rows of `stream` were sent. */
  backfillRows(stream: string, rows: number): void {
    if (rows > 0) this.#backfillRows.inc({ stream }, rows);
  }

  /** A request to `route` (its pattern) was answered with `status`. */
  httpRequest(route: string, method: string, status: number): void {
    this.#http.inc({ route, method, status: String(status) });
  }

  /** The exposition, in Prometheus text format. */
  async text(): Promise<string> {
    return await this.registry.metrics();
  }

  /** The exposition's content type. */
  get contentType(): string {
    return this.registry.contentType;
  }
}
