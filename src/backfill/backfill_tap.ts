/**
 * A stream's backfills, run beside one replication connection by the
 * watermark method of Netflix's DBLog (Andreakis & Papapanagiotou, 2020).
 * For each chunk the runner writes a low watermark to the log
 * (`pg_logical_emit_message`, in a transaction of its own), reads the chunk
 * (a short read of its own, which sees every transaction committed before
 * the low watermark), and writes a high watermark. The decoder, reading the
 * log in order, tells the tap of every change it sends of the table between
 * the two; at the high watermark the chunk's rows whose key changed in
 * between are dropped (the log's change is newer, and the consumer has it
 * already) and the rest sent, in the frame of the high watermark's
 * transaction. So the log always wins, and a consumer that applies every
 * frame in order ends with the table's rows.
 *
 * Acknowledging a frame confirms what it carried (the `started`, a chunk,
 * the `done`); that progress is stored, and a backfill resumes with the
 * first chunk not acknowledged, after a reconnect or a restart. Chunks of
 * a run that ended unacknowledged are read again (at least once); their
 * watermarks, replayed from the slot, match no chunk in flight and are
 * ignored.
 * @module
 */

import type pg from "pg";
import { type Lsn, parseLsn } from "../lsn.ts";
import { errorMessage, log } from "../observability/log.ts";
import type { BackfillMode } from "../protocol.ts";
import type { ReplicationTap } from "../replication/replication_service.ts";
import { NOT_THERE, type RawValue } from "../replication/row_filter.ts";
import type { StreamDefinition } from "../streams/stream_definition.ts";
import type { BackfillStore, StoredBackfill } from "./backfill_store.ts";
import {
  type BackfillTable,
  type Chunk,
  type ChunkLimits,
  DEFAULT_CHUNK_BYTES,
  DEFAULT_CHUNK_ROWS,
  estimateRows,
  keyString,
  readChunk,
  resolveBackfillTable,
  shapeOf,
} from "./chunk_reader.ts";

/** Prefix of the watermark messages. */
export const WATERMARK_PREFIX = "pgdeltastream.backfill";

/**
 * Transactions remembered as decoded before a low watermark. One that was
 * still in progress for a chunk's snapshot but whose commit the log carries
 * before the watermark commits just before it (between its commit record
 * and becoming visible: a synchronous standby's wait, say), so the last few
 * thousand are plenty.
 */
const RECENT_TRANSACTIONS = 4096;

/** An idle runner looks for new backfills this often (another instance may have queued one). */
const IDLE_POLL_MS = 1_000;
/** A chunk that failed (a timeout, a lost connection) is tried again after this long. */
const RETRY_MS = 1_000;

/** A watermark's content: whose, which step, and which of its marks. */
interface Watermark {
  stream: string;
  nonce: string;
  mark: "low" | "high" | "cancel";
}

/** How a step ended in the log. */
type Outcome = { sent: number } | "redo" | "reshaped";

/** The one step in flight: a chunk between its watermarks, or a cancellation. */
interface Flight {
  nonce: string;
  backfill: StoredBackfill;
  schema: string;
  table: string;
  /** A chunk's table as read; undefined for a cancellation. */
  read?: BackfillTable;
  /** Whether the low watermark's frame carries the backfill's `started`. */
  sendStarted: boolean;
  rowsBefore: number;
  rows?: Chunk;
  /** Keys the log changed since the low watermark. */
  dropped: Set<string>;
  /** Transactions the log carried shortly before the low watermark. */
  beforeLow?: Set<number>;
  truncated: boolean;
  /** A change whose key the log did not carry whole: the chunk cannot be judged, so it is read again. */
  unknownKey: boolean;
  /** The table's shape changed since the chunk's read began. */
  reshaped: boolean;
  /** Settles when the log reached the step's last mark. */
  done: PromiseWithResolvers<Outcome>;
}

/** What the consumer acknowledged of a backfill. */
interface Progress {
  startedAcked: boolean;
  cursor: string[] | null;
  rowsDone: number;
  done: boolean;
  cancelled: boolean;
}

/** Taps to wake when a stream's backfills change: one set per stream. */
export class BackfillWakers {
  readonly #wakers = new Map<string, Set<() => void>>();

  /** Calls `wake` whenever {@link wake} is called for `stream`, until the returned function is. */
  add(stream: string, wake: () => void): () => void {
    let set = this.#wakers.get(stream);
    if (set === undefined) this.#wakers.set(stream, set = new Set());
    set.add(wake);
    return () => {
      set.delete(wake);
      if (set.size === 0) this.#wakers.delete(stream);
    };
  }

  /** Wakes the taps of `stream`: a backfill was queued or cancelled. */
  wake(stream: string): void {
    for (const wake of this.#wakers.get(stream) ?? []) wake();
  }
}

/** What a tap works with. */
export interface BackfillTapOptions {
  pool: pg.Pool;
  store: BackfillStore;
  stream: string;
  definition: StreamDefinition;
  wakers: BackfillWakers;
  limits?: ChunkLimits;
  /** Told of the rows each chunk sent (for the metrics). */
  countRows?: (rows: number) => void;
}

/** `{"kind":"backfill",…}` of `flight` in `state`. */
function backfillChange(
  flight: Flight,
  state: "started" | "done" | "cancelled",
  extra: { mode?: BackfillMode; rows?: number } = {},
): string {
  return JSON.stringify({
    kind: "backfill",
    id: flight.backfill.id,
    schema: flight.schema,
    table: flight.table,
    state,
    ...extra,
  });
}

/** A random nonce: watermarks are told apart by it (an old run's, another's, a forged one). */
function nonce(): string {
  return [...crypto.getRandomValues(new Uint8Array(12))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** One replication connection's backfills: see the module's documentation. */
export class BackfillTap implements ReplicationTap {
  readonly prefix = WATERMARK_PREFIX;
  watching = 0;
  readonly #options: BackfillTapOptions;
  readonly #limits: ChunkLimits;
  readonly #abort = new AbortController();
  #flight: Flight | undefined;
  /** The mark seen in the open transaction, of the flight's. */
  #mark: Watermark["mark"] | undefined;
  /** What frames sent in this run carried, until acknowledged: in position order. */
  readonly #unacked: { lsn: Lsn; id: string; apply: (p: Progress) => void }[] = [];
  readonly #progress = new Map<string, Progress>();
  /** Progress written in order, one write after another. */
  #writes: Promise<void> = Promise.resolve();
  #run: Promise<void> = Promise.resolve();
  #wake: (() => void) | undefined;
  /** The last {@link RECENT_TRANSACTIONS} xids decoded, a ring. */
  readonly #recent = new Uint32Array(RECENT_TRANSACTIONS);
  #decoded = 0;
  /** Key positions of each relation's columns (by its names array), for {@link touched}. */
  readonly #keyPositions = new WeakMap<readonly string[], number[] | undefined>();

  /** A tap of `options.stream`'s backfills. */
  constructor(options: BackfillTapOptions) {
    this.#options = options;
    this.#limits = options.limits ?? { rows: DEFAULT_CHUNK_ROWS, bytes: DEFAULT_CHUNK_BYTES };
  }

  start(): void {
    const stop = this.#options.wakers.add(this.#options.stream, () => this.#wake?.());
    this.#abort.signal.addEventListener("abort", stop, { once: true });
    this.#run = this.#loop();
  }

  async close(): Promise<void> {
    this.#abort.abort();
    this.#wake?.();
    this.#flight?.done.reject(new Error("replication ended"));
    await this.#run;
    await this.#writes;
  }

  // ---- the decoder's side: the log, in order ---------------------------------------------------

  message(content: string): void {
    const flight = this.#flight;
    if (flight === undefined) return;
    let mark: Watermark;
    try {
      mark = JSON.parse(content);
    } catch {
      return;
    }
    if (mark.stream === this.#options.stream && mark.nonce === flight.nonce) this.#mark = mark.mark;
  }

  began(xid: number): void {
    this.#recent[this.#decoded++ % RECENT_TRANSACTIONS] = xid;
  }

  touched(names: readonly string[], values: RawValue[]): void {
    const flight = this.#flight;
    if (flight?.read === undefined) return;
    let positions = this.#keyPositions.get(names);
    if (!this.#keyPositions.has(names)) {
      const at = flight.read.key.map((k) => names.indexOf(k.name));
      positions = at.includes(-1) ? undefined : at;
      this.#keyPositions.set(names, positions);
    }
    if (positions === undefined) {
      flight.unknownKey = true;
      return;
    }
    const key: (string | null)[] = [];
    for (const i of positions) {
      const value = values[i];
      if (value === NOT_THERE) {
        flight.unknownKey = true;
        return;
      }
      key.push(value);
    }
    flight.dropped.add(keyString(key));
  }

  truncated(): void {
    if (this.#flight !== undefined) this.#flight.truncated = true;
  }

  described(names: readonly string[], types: readonly number[]): void {
    const flight = this.#flight;
    if (flight?.read !== undefined && shapeOf(names, types) !== flight.read.shape) {
      flight.reshaped = true;
    }
  }

  committed(nextLsn: string): readonly string[] | undefined {
    const mark = this.#mark;
    const flight = this.#flight;
    this.#mark = undefined;
    if (mark === undefined || flight === undefined) return undefined;
    const lsn = parseLsn(nextLsn);
    const id = flight.backfill.id;
    if (mark === "low") {
      // The window opens: changes of the table from here to the high watermark are noted.
      this.watching = flight.read!.oid;
      flight.beforeLow = new Set(
        this.#recent.subarray(0, Math.min(this.#decoded, RECENT_TRANSACTIONS)),
      );
      if (!flight.sendStarted) return undefined;
      // The consumer's copy starts again here (under `replace` it drops it): so does the progress.
      this.#unacked.push({
        lsn,
        id,
        apply: (p) => Object.assign(p, { startedAcked: true, cursor: null, rowsDone: 0 }),
      });
      return [backfillChange(flight, "started", { mode: flight.backfill.mode })];
    }
    this.watching = 0;
    if (mark === "cancel" || flight.reshaped) {
      this.#unacked.push({ lsn, id, apply: (p) => (p.cancelled = true) });
      flight.done.resolve(mark === "cancel" ? { sent: 0 } : "reshaped");
      return [backfillChange(flight, "cancelled")];
    }
    const chunk = flight.rows!;
    // A transaction the chunk's read did not see, committed ahead of the window: its changes are
    // in neither, so the chunk is read again (it sees it now).
    if (flight.unknownKey || chunk.inProgress.some((xid) => flight.beforeLow?.has(xid))) {
      flight.done.resolve("redo");
      return undefined;
    }
    const changes: string[] = [];
    if (!flight.truncated) {
      for (let i = 0; i < chunk.changes.length; i++) {
        if (!flight.dropped.has(chunk.keys[i])) changes.push(chunk.changes[i]);
      }
    }
    const sent = changes.length;
    const rowsDone = flight.rowsBefore + sent;
    if (chunk.last) changes.push(backfillChange(flight, "done", { rows: rowsDone }));
    const cursor = chunk.lastKey;
    this.#unacked.push({
      lsn,
      id,
      apply: (p) => {
        p.startedAcked = true;
        p.cursor = cursor;
        p.rowsDone = rowsDone;
        p.done = chunk.last;
      },
    });
    this.#options.countRows?.(sent);
    flight.done.resolve({ sent });
    return changes;
  }

  // ---- the consumer's acknowledgements ---------------------------------------------------------

  acknowledged(lsn: Lsn): void {
    const touched = new Set<string>();
    while (this.#unacked.length > 0 && this.#unacked[0].lsn <= lsn) {
      const { id, apply } = this.#unacked.shift()!;
      const progress = this.#progress.get(id);
      if (progress === undefined) continue;
      apply(progress);
      touched.add(id);
    }
    for (const id of touched) {
      const progress = { ...this.#progress.get(id)! };
      const { store } = this.#options;
      this.#writes = this.#writes.then(() =>
        progress.cancelled ? store.cancelled(id) : store.progress(id, progress)
      ).catch((error) =>
        log.warn("backfill.progress_failed", "a backfill's progress could not be stored", {
          stream: this.#options.stream,
          backfill: id,
          error: errorMessage(error),
        })
      );
    }
  }

  // ---- the runner ------------------------------------------------------------------------------

  async #loop(): Promise<void> {
    const signal = this.#abort.signal;
    const { store, stream } = this.#options;
    // Backfills whose last frame this run sent: not worked on again while it awaits its ack.
    const finished = new Set<string>();
    while (!signal.aborted) {
      try {
        const backfill = await store.next(stream, [...finished]);
        if (backfill === undefined) {
          await this.#idle(IDLE_POLL_MS);
          continue;
        }
        const last = backfill.state === "cancelling"
          ? await this.#cancel(backfill)
          : await this.#fill(backfill);
        if (last) finished.add(backfill.id);
      } catch (error) {
        if (signal.aborted) return;
        log.warn("backfill.retry", `a backfill of stream "${stream}" failed; trying again`, {
          stream,
          error: errorMessage(error),
        });
        this.#flight = undefined;
        await this.#idle(RETRY_MS);
      }
    }
  }

  /** Waits `ms`, or until woken or closed. */
  #idle(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      this.#wake = done;
      function done() {
        clearTimeout(timer);
        resolve();
      }
      if (this.#abort.signal.aborted) done();
    });
  }

  /** Writes the mark `mark` of `flight` to the log. */
  async #emit(flight: Flight, mark: Watermark["mark"]): Promise<void> {
    const content: Watermark = { stream: this.#options.stream, nonce: flight.nonce, mark };
    await this.#options.pool.query("SELECT pg_logical_emit_message(true, $1, $2)", [
      WATERMARK_PREFIX,
      JSON.stringify(content),
    ]);
  }

  /** Waits for the log to reach `flight`'s last mark. */
  async #landed(flight: Flight): Promise<Outcome> {
    try {
      return await flight.done.promise;
    } finally {
      this.#flight = undefined;
    }
  }

  #newFlight(backfill: StoredBackfill, schema: string, table: string): Flight {
    const flight: Flight = {
      nonce: nonce(),
      backfill,
      schema,
      table,
      sendStarted: false,
      rowsBefore: 0,
      dropped: new Set(),
      truncated: false,
      unknownKey: false,
      reshaped: false,
      done: Promise.withResolvers(),
    };
    flight.done.promise.catch(() => {});
    return flight;
  }

  /** Sends a cancelled backfill's `cancelled`; true when sent. */
  async #cancel(backfill: StoredBackfill): Promise<boolean> {
    this.#track(backfill);
    const flight = this.#newFlight(backfill, backfill.schema, backfill.table);
    this.#flight = flight;
    await this.#emit(flight, "cancel");
    await this.#landed(flight);
    log.info(
      "backfill.cancelled",
      `backfill ${backfill.id} of stream "${backfill.stream}" was cancelled`,
      {
        stream: backfill.stream,
        backfill: backfill.id,
      },
    );
    return true;
  }

  /** What the consumer acknowledged of `backfill`, as this run starts from it. */
  #track(backfill: StoredBackfill): Progress {
    let progress = this.#progress.get(backfill.id);
    if (progress === undefined) {
      // A `started` not acknowledged is sent again, and with it every chunk: under `replace` the
      // consumer drops its copy when it sees it.
      progress = backfill.startedAcked
        ? {
          startedAcked: true,
          cursor: backfill.cursor,
          rowsDone: backfill.rowsDone,
          done: false,
          cancelled: false,
        }
        : { startedAcked: false, cursor: null, rowsDone: 0, done: false, cancelled: false };
      this.#progress.set(backfill.id, progress);
    }
    return progress;
  }

  /** Sends `backfill`'s chunks from its first one not acknowledged; true when its last was sent. */
  async #fill(backfill: StoredBackfill): Promise<boolean> {
    const { pool, store, definition } = this.#options;
    const signal = this.#abort.signal;
    const stored = definition.tables.find((t) => t.oid === backfill.tableOid);
    if (stored === undefined) {
      await store.cancel(backfill.stream, backfill.id);
      return false;
    }
    const progress = this.#track(backfill);
    let sendStarted = !progress.startedAcked;
    let cursor = progress.cursor;
    let rowsBefore = progress.rowsDone;
    const where = [...stored.where, ...backfill.conditions];
    let shape = backfill.shape;
    for (;;) {
      if (signal.aborted) return false;
      const now = await store.get(backfill.stream, backfill.id);
      if (now?.state !== "running" && now?.state !== "queued") return false; // cancelled meanwhile
      const read = await resolveBackfillTable(pool, stored);
      if (shape === null) {
        await store.begin(backfill.id, await estimateRows(pool, read, where), read.shape);
        shape = read.shape;
      }
      if (read.shape !== shape) {
        await this.#reshaped(backfill);
        return false;
      }
      const flight = this.#newFlight(backfill, read.schema, read.table);
      Object.assign(flight, { read, sendStarted, rowsBefore });
      this.#flight = flight;
      await this.#emit(flight, "low");
      flight.rows = await readChunk(pool, read, where, cursor, this.#limits);
      await this.#emit(flight, "high");
      const outcome = await this.#landed(flight);
      if (outcome === "redo") continue;
      if (outcome === "reshaped") {
        await this.#reshaped(backfill, true);
        return true;
      }
      sendStarted = false;
      cursor = flight.rows.lastKey;
      rowsBefore += outcome.sent;
      if (flight.rows.last) {
        log.info(
          "backfill.sent",
          `backfill ${backfill.id} of stream "${backfill.stream}" sent its last chunk`,
          {
            stream: backfill.stream,
            backfill: backfill.id,
            rows: rowsBefore,
          },
        );
        return true;
      }
    }
  }

  /**
   * The table's columns changed during `backfill`: it ends cancelled (its
   * rows so far have the old shape), and a `replace` backfill starts anew.
   * `sent`: its `cancelled` is sent already; else it is sent next.
   */
  async #reshaped(backfill: StoredBackfill, sent = false): Promise<void> {
    const { store } = this.#options;
    await store.cancel(backfill.stream, backfill.id);
    const again = await store.queue({
      stream: backfill.stream,
      tableOid: backfill.tableOid,
      schema: backfill.schema,
      table: backfill.table,
      mode: "replace",
      conditions: backfill.conditions,
    });
    log.info(
      "backfill.reshaped",
      `the table of backfill ${backfill.id} changed shape; ${again.id} replaces it`,
      {
        stream: backfill.stream,
        backfill: backfill.id,
        next: again.id,
        cancelledSent: sent,
      },
    );
  }
}
