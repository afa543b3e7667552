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

import client from "prom-client";
import type { Lsn } from "../lsn.ts";
import type { Frame } from "../replication/pgoutput_decoder.ts";
import type { SessionObserver } from "../streams/stream_session.ts";

/** The label value of v1 slots. */
export const V1_STREAM_LABEL = "v1";

/** What the metrics read when scraped. */
export interface MetricSources {
  /** Each stream's slot lag in bytes (null when its slot is gone), by stream label. */
  lag(): Promise<Map<string, number | null>>;
  /** Read-only tails, by stream. */
  tails(): Map<string, number>;
}

/** A session's view of the metrics: an observer of its frames and acks, and its end. */
export interface SessionMetrics extends SessionObserver {
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

/** Default process metrics that read `/proc/self`, which Deno opens only with `--allow-all`. */
const UNREADABLE_DEFAULTS = [
  "process_resident_memory_bytes",
  "process_virtual_memory_bytes",
  "process_heap_bytes",
  "process_open_fds",
  "process_max_fds",
];

/** Outside printable ASCII (JSON text has no raw control characters). */
const NON_ASCII = /[^ -~]/;
const encoder = new TextEncoder();

/** UTF-8 length of `text`; its length when it is ASCII, which frames nearly always are. */
function utf8Bytes(text: string): number {
  return !NON_ASCII.test(text) ? text.length : encoder.encode(text).length;
}

/** The server's metrics registry. */
export class Metrics {
  /** The registry `/metrics` exposes. */
  readonly registry: client.Registry = new client.Registry();
  readonly #connected: client.Gauge<"stream">;
  readonly #frames: client.Counter<"stream">;
  readonly #changes: client.Counter<"stream">;
  readonly #bytes: client.Counter<"stream">;
  readonly #acks: client.Counter<"stream">;
  readonly #redelivered: client.Counter<"stream">;
  readonly #latency: client.Histogram<"stream">;
  readonly #snapshotRows: client.Counter<"stream">;
  readonly #http: client.Counter<"route" | "method" | "status">;
  /** The highest nextlsn sent per stream in this process: a frame at or below it is sent again. */
  readonly #highest = new Map<string, Lsn>();

  /** Metrics whose scrape-time values come from `sources`. */
  constructor(sources: MetricSources) {
    const registers = [this.registry];
    const stream = ["stream"] as const;
    new client.Gauge({
      name: "pgdeltastream_stream_lag_bytes",
      help: "WAL between the database's current position and the stream's confirmed position",
      labelNames: stream,
      registers,
      async collect() {
        this.reset();
        for (const [name, lag] of await sources.lag()) {
          if (lag !== null) this.set({ stream: name }, lag);
        }
      },
    });
    this.#connected = new client.Gauge({
      name: "pgdeltastream_stream_connected",
      help: "1 while a consumer is connected to the stream",
      labelNames: stream,
      registers,
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
    this.#frames = counter("pgdeltastream_frames_sent_total", "Transaction frames sent");
    this.#changes = counter("pgdeltastream_changes_sent_total", "Changes sent, in frames");
    this.#bytes = counter("pgdeltastream_bytes_sent_total", "UTF-8 bytes of the frames sent");
    this.#acks = counter("pgdeltastream_acks_total", "Acknowledgements that moved a position");
    this.#redelivered = counter(
      "pgdeltastream_redelivered_frames_total",
      "Frames sent again after a reconnect (this process's memory of what it sent)",
    );
    this.#snapshotRows = counter("pgdeltastream_snapshot_rows_total", "Snapshot rows returned");
    this.#latency = new client.Histogram({
      name: "pgdeltastream_commit_to_send_seconds",
      help: "From the transaction's commit timestamp to the frame's write on the socket",
      labelNames: stream,
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.#http = new client.Counter({
      name: "pgdeltastream_http_requests_total",
      help: "HTTP requests answered, by route pattern, method and status",
      labelNames: ["route", "method", "status"] as const,
      registers,
    });
    client.collectDefaultMetrics({ register: this.registry });
    for (const name of UNREADABLE_DEFAULTS) this.registry.removeSingleMetric(name);
    new client.Gauge({
      name: "process_resident_memory_bytes",
      help: "Resident memory size in bytes.",
      registers,
      collect() {
        this.set(Deno.memoryUsage().rss);
      },
    });
  }

  /** Counts the frames, changes, bytes and acks of a session of `stream`, and its connection. */
  session(stream: string): SessionMetrics {
    const labels = { stream };
    const frames = this.#frames.labels(labels);
    const changes = this.#changes.labels(labels);
    const bytes = this.#bytes.labels(labels);
    const acks = this.#acks.labels(labels);
    const redelivered = this.#redelivered.labels(labels);
    const latency = this.#latency.labels(labels);
    const connected = this.#connected.labels(labels);
    const highest = this.#highest;
    connected.inc();
    return {
      sent(frame: Frame) {
        frames.inc();
        changes.inc(frame.changes);
        bytes.inc(utf8Bytes(frame.text));
        const top = highest.get(stream) ?? 0n;
        // A partial chunk carries the previous transaction's nextlsn: only below the top is it a repeat.
        if (frame.partial ? frame.nextLsn < top : frame.nextLsn <= top) redelivered.inc();
        else if (!frame.partial) highest.set(stream, frame.nextLsn);
        latency.observe(Math.max(0, Date.now() - frame.commitTime) / 1000);
      },
      acknowledged() {
        acks.inc();
      },
      ended() {
        connected.dec();
      },
    };
  }

  /** `rows` snapshot rows of `stream` were returned. */
  snapshotRows(stream: string, rows: number): void {
    if (rows > 0) this.#snapshotRows.inc({ stream }, rows);
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
