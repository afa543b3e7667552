/**
 * A stream's backfills, run beside one replication connection by the
 * watermark method of Netflix's DBLog (Andreakis & Papapanagiotou, 2020).
 * For each chunk the runner writes a low watermark to the log
 * (`pg_logical_emit_message`, in a transaction of its own), reads the chunk
 * (a short read of its own, which sees every transaction committed before
 * the low watermark), and writes a high watermark — which is the next
 * chunk's low one, so that each chunk costs one commit and the runner reads
 * ahead of the log (at most {@link CHUNKS_AHEAD} chunks). The decoder, reading the
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
import type { BackfillMode, StreamOperation } from "../protocol.ts";
import type { ReplicationTap } from "../replication/replication_service.ts";
import { NOT_THERE, type RawValue } from "../replication/row_filter.ts";
import type { StoredCondition, StreamDefinition } from "../streams/stream_definition.ts";
import type { StreamScope, TappedChanges } from "../replication/pgoutput_decoder.ts";
import { PgConnection } from "../postgres/pg_connection.ts";
import { sqlState } from "../postgres/database.ts";
import { InvalidRequestError, NotFoundError } from "../errors.ts";
import type { DatabaseConfig } from "../config.ts";
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
/** How often a running backfill looks whether it was cancelled, or its table changed shape. */
const CHECK_MS = 1_000;
/** Rows a chunk asks for, at least, however wide they are. */
const MIN_CHUNK_ROWS = 100;
/** Chunks read ahead of the log, at most: read, their low watermark written, not yet sent. */
const CHUNKS_AHEAD = 8;

/**
 * A watermark's content: whose, and the steps it marks. One message closes
 * a chunk's window (`high`) and opens the next one's (`low`): the windows of
 * a backfill's chunks follow each other in the log, with one commit each.
 */
interface Watermark {
  stream: string;
  low?: string;
  high?: string;
  cancel?: string;
  /** A change of the stream's definition (`PATCH`) takes effect here: its nonce. */
  switch?: string;
}

/** A change of a stream's definition, as the transaction that made it left it in the store. */
export interface DefinitionSwitch {
  /** The change's nonce, as its watermark carries it. */
  nonce: string;
  /** What the stream carries from the change on. */
  definition: StreamDefinition;
  /** The changes its frame carries (`removed`, `cancelled`, `started`), as JSON texts. */
  changes: string[];
  /** Backfills whose `started` the frame carries (their rows follow, with no `started` of their own). */
  started: string[];
  /** Backfills the change ended (their tables left the stream or changed). */
  ended: string[];
}

/** A change of the definition that the log may still bring, as a replication starts. */
export interface PendingSwitch {
  nonce: string;
  /** Its transaction's commit position, once a decoder saw it; null before. */
  lsn: Lsn | null;
  /** The definition from the change on. */
  definition: StreamDefinition;
}

/** How a step ended in the log. */
type Outcome = { sent: number } | "redo" | "reshaped" | "abandoned";

/** A step: a chunk between its watermarks, or a cancellation. */
interface Flight {
  nonce: string;
  backfill: StoredBackfill;
  schema: string;
  table: string;
  /** A chunk's table as read; undefined for a cancellation. */
  read?: BackfillTable;
  /** Whether the low watermark's frame carries the backfill's `started`. */
  sendStarted: boolean;
  /** Where the chunk starts: the key of the row before it (null: the table's start). */
  cursorBefore: string[] | null;
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
  /** Settles when the log reached the step's last mark (or the step was given up). */
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
  /** Where chunks are read (a connection of the tap's own, for COPY). */
  database: DatabaseConfig;
  pool: pg.Pool;
  store: BackfillStore;
  stream: string;
  definition: StreamDefinition;
  wakers: BackfillWakers;
  /** A change of the definition not yet confirmed: `definition` is the one before it. */
  pendingSwitch?: PendingSwitch;
  /** The decoder's scope of a definition (for a change of it). */
  scopeOf?: (definition: StreamDefinition) => StreamScope;
  /**
   * A change of the definition that the log brings: checked in the store
   * (its nonce is the stream's current change's, or it is not one), where
   * its transaction's commit position `txLsn` is recorded before its frame
   * may be sent.
   */
  markSwitch?: (nonce: string, txLsn: Lsn) => Promise<DefinitionSwitch | undefined>;
  /**
   * The stream's change of definition in the store, if it has one: a change
   * recorded while this tap runs is ahead of its decoder until its watermark
   * comes, and no backfill runs meanwhile.
   */
  storedSwitch?: () => Promise<PendingSwitch | undefined>;
  /** The publications a replication of `definition` reads (for a change that adds kinds of change). */
  publicationsOf?: (definition: StreamDefinition) => Promise<string[]>;
  /** The kinds of change the walsender was started for (default: the definition's). */
  reading?: readonly StreamOperation[];
  limits?: ChunkLimits;
  /** Told of the rows each chunk sent (for the metrics). */
  countRows?: (rows: number) => void;
}

/** `{"kind":"backfill",…}` of `flight` in `state`. */
function backfillChange(
  flight: Flight,
  state: "started" | "done" | "cancelled",
  extra: { mode?: BackfillMode; rows?: number; reason?: string } = {},
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

/**
 * Why a backfill's failure is for good, or undefined when trying again may
 * help: its table is gone or has no key to read it by, or PostgreSQL refuses
 * the read itself (SQLSTATE class 42: a column the filter names is gone, no
 * privilege).
 */
function permanentFailure(error: unknown): string | undefined {
  if (error instanceof NotFoundError || error instanceof InvalidRequestError) return error.message;
  return sqlState(error)?.startsWith("42") ? `Cannot backfill: ${errorMessage(error)}` : undefined;
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
  #limits: ChunkLimits;
  readonly #abort = new AbortController();
  /** Steps whose watermarks the log may still bring, in the order they were made. */
  readonly #flights = new Map<string, Flight>();
  /** The chunk whose window is open: its low watermark was decoded, its high one not yet. */
  #open: Flight | undefined;
  /** The steps the open transaction's watermark marks. */
  #marks: { low?: Flight; high?: Flight; cancel?: Flight } | undefined;
  /**
   * Counts the times chunks read ahead were given up, because one before them
   * has to be read again (or its table changed shape): with where to start again.
   */
  #generation = 0;
  #restart: { cursor: string[] | null; reshaped: boolean } | undefined;
  /** What frames sent in this run carried, until acknowledged: in position order. */
  readonly #unacked: { lsn: Lsn; id: string; apply: (p: Progress) => void }[] = [];
  readonly #progress = new Map<string, Progress>();
  /** Rows sent of each backfill, all runs together (what `done` reports). */
  readonly #sentRows = new Map<string, number>();
  /**
   * Where each backfill this tap sent frames of stands in them: the last key
   * sent (null: only its `started`). The consumer gets this connection's
   * frames in order, so a run that begins again (after a failed read) goes on
   * from here, and never sends a second `started`.
   */
  readonly #sentCursor = new Map<string, string[] | null>();
  /** Progress written in order, one write after another. */
  #writes: Promise<void> = Promise.resolve();
  #run: Promise<void> = Promise.resolve();
  /** The connection chunks are read on, while it works. */
  #reader: PgConnection | undefined;
  #wake: (() => void) | undefined;
  /** The last {@link RECENT_TRANSACTIONS} xids decoded, a ring. */
  readonly #recent = new Uint32Array(RECENT_TRANSACTIONS);
  #decoded = 0;
  /** Key positions of each relation's columns (by its names array), for {@link touched}. */
  readonly #keyPositions = new WeakMap<readonly string[], number[] | undefined>();
  /** The definition the log carries at the decoder's position. */
  #definition: StreamDefinition;
  /** A change of the definition ahead in the log: no backfill runs before it takes effect. */
  #awaiting: PendingSwitch | undefined;
  /** The change the open transaction carries, checked. */
  #switching: DefinitionSwitch | undefined;
  /** The scope to hand the decoder, once. */
  #newScope: StreamScope | undefined;
  /** Backfills a change of the definition ended: nothing more of them is sent. */
  readonly #ended = new Set<string>();
  /** The changes of the definition this tap's decoder carried out. */
  readonly #applied = new Set<string>();
  /** The kinds of change the walsender reads. */
  #reading: Set<StreamOperation>;
  /** Where the replication starts again, with which publications, after a change that needs it. */
  #republish: { publications: Promise<string[]>; from: Lsn } | undefined;

  /** A tap of `options.stream`'s backfills. */
  constructor(options: BackfillTapOptions) {
    this.#options = options;
    this.#limits = options.limits ?? { rows: DEFAULT_CHUNK_ROWS, bytes: DEFAULT_CHUNK_BYTES };
    this.#definition = options.definition;
    this.#awaiting = options.pendingSwitch;
    this.#reading = new Set(options.reading ?? options.definition.operations);
  }

  start(chunkBytes: number): void {
    // A chunk's rows make one frame: no larger than the replication's frames (relay mode: NATS's
    // max_payload).
    this.#limits = { ...this.#limits, bytes: Math.min(this.#limits.bytes, chunkBytes) };
    const stop = this.#options.wakers.add(this.#options.stream, () => this.#wake?.());
    this.#abort.signal.addEventListener("abort", stop, { once: true });
    this.#run = this.#loop();
  }

  async close(): Promise<void> {
    this.#abort.abort();
    this.#wake?.();
    this.#giveUp();
    await this.#run;
    await this.#writes;
    await this.#reader?.close();
  }

  /** Gives up every step in flight: their watermarks, if the log brings them, are ignored. */
  #giveUp(): void {
    for (const flight of this.#flights.values()) flight.done.resolve("abandoned");
    this.#flights.clear();
    this.#open = undefined;
    this.watching = 0;
  }

  // ---- the decoder's side: the log, in order ---------------------------------------------------

  message(content: string, txLsn: Lsn): void | Promise<void> {
    let mark: Watermark;
    try {
      mark = JSON.parse(content);
    } catch {
      return;
    }
    if (mark.stream !== this.#options.stream) return;
    if (typeof mark.switch === "string") {
      const markSwitch = this.#options.markSwitch;
      if (markSwitch === undefined) return;
      // Held until the store has it: its frame is not sent before its position is recorded.
      return markSwitch(mark.switch, txLsn).then((found) => {
        if (found !== undefined) this.#switching = found;
      });
    }
    const find = (nonce?: string) => nonce === undefined ? undefined : this.#flights.get(nonce);
    this.#marks = { low: find(mark.low), high: find(mark.high), cancel: find(mark.cancel) };
  }

  began(xid: number, txLsn: Lsn): void {
    this.#recent[this.#decoded++ % RECENT_TRANSACTIONS] = xid;
    const awaiting = this.#awaiting;
    if (awaiting?.lsn != null && txLsn > awaiting.lsn) {
      // The change was confirmed before this run began (the slot was ahead of what was read of it):
      // it holds from here on.
      this.#switchTo(awaiting.nonce, awaiting.definition);
    }
  }

  republish(): { publications: Promise<string[]>; from: Lsn } | undefined {
    const restart = this.#republish;
    this.#republish = undefined;
    return restart;
  }

  rescope(): StreamScope | undefined {
    const scope = this.#newScope;
    this.#newScope = undefined;
    return scope;
  }

  /** The definition is `definition` (of the change `nonce`) from the decoder's position on. */
  #switchTo(nonce: string, definition: StreamDefinition): void {
    this.#applied.add(nonce);
    this.#definition = definition;
    this.#awaiting = undefined;
    this.#newScope = this.#options.scopeOf?.(definition);
    this.#wake?.();
  }

  touched(names: readonly string[], values: RawValue[]): void {
    const flight = this.#open;
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
    if (this.#open !== undefined) this.#open.truncated = true;
  }

  described(names: readonly string[], types: readonly number[]): void {
    const flight = this.#open;
    if (flight?.read !== undefined && shapeOf(names, types) !== flight.read.shape) {
      flight.reshaped = true;
    }
  }

  committed(nextLsn: string): readonly TappedChanges[] | undefined {
    const switching = this.#switching;
    this.#switching = undefined;
    if (switching !== undefined) return this.#switched(switching, parseLsn(nextLsn));
    const marks = this.#marks;
    this.#marks = undefined;
    if (marks === undefined) return undefined;
    const lsn = parseLsn(nextLsn);
    const changes: TappedChanges[] = [];
    if (marks.cancel !== undefined) this.#cancelled(marks.cancel, lsn, changes);
    // A high mark first: a watermark closes one chunk's window and opens the next one's.
    if (marks.high !== undefined) this.#closeWindow(marks.high, lsn, changes);
    const low = marks.low;
    if (low !== undefined && this.#flights.has(low.nonce)) {
      // The window opens: changes of the table from here to the high watermark are noted.
      this.#open = low;
      this.watching = low.read!.oid;
      low.beforeLow = new Set(
        this.#recent.subarray(0, Math.min(this.#decoded, RECENT_TRANSACTIONS)),
      );
      if (low.sendStarted) {
        // The consumer's copy starts again here (under `replace` it drops it): so does the progress.
        this.#sentRows.set(low.backfill.id, 0);
        this.#sentCursor.set(low.backfill.id, null);
        this.#unacked.push({
          lsn,
          id: low.backfill.id,
          apply: (p) => Object.assign(p, { startedAcked: true, cursor: null, rowsDone: 0 }),
        });
        changes.push(backfillChange(low, "started", { mode: low.backfill.mode }));
      }
    }
    return changes.length > 0 ? changes : undefined;
  }

  /**
   * The transaction of a change of the definition: its frame carries the
   * change's `removed`, `cancelled` and `started`; the backfills it ended
   * send nothing more, and those it started go on from their first chunk.
   */
  #switched(change: DefinitionSwitch, lsn: Lsn): readonly TappedChanges[] | undefined {
    for (const id of change.ended) this.#ended.add(id);
    const running = [...this.#flights.values()].some((f) => this.#ended.has(f.backfill.id));
    if (running) {
      // The chunks read ahead of a backfill it ended are never sent.
      this.#giveUp();
      this.#generation++;
      this.#restart = { cursor: null, reshaped: false };
    }
    for (const id of change.started) {
      this.#sentRows.set(id, 0);
      this.#sentCursor.set(id, null);
      if (!this.#progress.has(id)) {
        this.#progress.set(id, {
          startedAcked: false,
          cursor: null,
          rowsDone: 0,
          done: false,
          cancelled: false,
        });
      }
      this.#unacked.push({
        lsn,
        id,
        apply: (p) => Object.assign(p, { startedAcked: true, cursor: null, rowsDone: 0 }),
      });
    }
    const publicationsOf = this.#options.publicationsOf;
    if (
      publicationsOf !== undefined &&
      change.definition.operations.some((o) => !this.#reading.has(o))
    ) {
      this.#reading = new Set(change.definition.operations);
      // The walsender was started for fewer kinds of change: from the change's end it is started
      // again with the publications of the new definition.
      const publications = publicationsOf(change.definition);
      publications.catch(() => {}); // the replication's restart reports it
      this.#republish = { publications, from: lsn };
    }
    this.#switchTo(change.nonce, change.definition);
    return change.changes.length > 0 ? change.changes : undefined;
  }

  /** A cancellation's mark: the backfill's `cancelled`. */
  #cancelled(flight: Flight, lsn: Lsn, changes: TappedChanges[]): void {
    this.#flights.delete(flight.nonce);
    this.#unacked.push({ lsn, id: flight.backfill.id, apply: (p) => (p.cancelled = true) });
    const reason = flight.backfill.reason;
    changes.push(backfillChange(flight, "cancelled", reason === null ? {} : { reason }));
    flight.done.resolve({ sent: 0 });
  }

  /** A chunk's high mark: its rows the log did not change meanwhile, or a reason to read it again. */
  #closeWindow(flight: Flight, lsn: Lsn, changes: TappedChanges[]): void {
    this.#flights.delete(flight.nonce);
    if (this.#open === flight) {
      this.#open = undefined;
      this.watching = 0;
    }
    const chunk = flight.rows!;
    // A transaction the chunk's read did not see, committed ahead of the window: its changes are
    // in neither, so the chunk is read again (it sees it now). So is a chunk whose table (or one of
    // its partitions: which rows went is not known) was truncated in the window. A table whose
    // shape changed ends the backfill. Either way the chunks read after it are given up: their
    // rows would come first.
    const redo = flight.unknownKey || flight.truncated ||
      chunk.inProgress.some((xid) => flight.beforeLow?.has(xid));
    if (redo || flight.reshaped) {
      this.#giveUp();
      this.#generation++;
      this.#restart = { cursor: flight.cursorBefore, reshaped: flight.reshaped };
      if (flight.reshaped) {
        this.#unacked.push({ lsn, id: flight.backfill.id, apply: (p) => (p.cancelled = true) });
        changes.push(backfillChange(flight, "cancelled"));
      }
      flight.done.resolve(flight.reshaped ? "reshaped" : "redo");
      return;
    }
    const id = flight.backfill.id;
    let sent = 0;
    // The rows kept, as runs of consecutive ones: each run one slice of the chunk's bytes.
    const { bytes, starts } = chunk;
    let from = -1;
    const run = (to: number) => {
      if (from < 0) return;
      const end = (to < starts.length ? starts[to] : bytes.length) - 1; // its trailing comma
      changes.push({ bytes: bytes.subarray(starts[from], end), count: to - from });
      sent += to - from;
      from = -1;
    };
    if (flight.dropped.size === 0) {
      if (chunk.rows > 0) from = 0;
    } else {
      for (let i = 0; i < chunk.rows; i++) {
        if (flight.dropped.has(chunk.keyAt(i))) run(i);
        else if (from < 0) from = i;
      }
    }
    run(chunk.rows);
    const rowsDone = (this.#sentRows.get(id) ?? 0) + sent;
    this.#sentRows.set(id, rowsDone);
    if (chunk.last) changes.push(backfillChange(flight, "done", { rows: rowsDone }));
    const cursor = chunk.lastKey;
    this.#sentCursor.set(id, cursor);
    this.#unacked.push({
      lsn,
      id,
      apply: (p) => Object.assign(p, { startedAcked: true, cursor, rowsDone, done: chunk.last }),
    });
    this.#options.countRows?.(sent);
    flight.done.resolve({ sent });
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
      let backfill: StoredBackfill | undefined;
      if (this.#awaiting !== undefined) {
        // The log has a change of the definition ahead: backfills run under the definition after it.
        await this.#idle(IDLE_POLL_MS);
        continue;
      }
      try {
        const stored = await this.#options.storedSwitch?.();
        if (stored !== undefined && !this.#applied.has(stored.nonce) && !signal.aborted) {
          // Recorded since this run began (the decoder has not carried it out meanwhile): the
          // backfills it queued are of the definition after it.
          this.#awaiting = stored;
          continue;
        }
        backfill = await store.next(stream, [...finished]);
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
        this.#giveUp();
        const reason = permanentFailure(error);
        if (backfill !== undefined && backfill.state !== "cancelling" && reason !== undefined) {
          // It never can be read: it ends cancelled (saying why, in its frame if it began), and
          // the stream's next backfill goes on, rather than wait behind it for good.
          const cancelled = await store.cancel(stream, backfill.id, reason).catch(() => undefined);
          if (cancelled !== undefined) {
            log.warn(
              "backfill.failed",
              `backfill ${backfill.id} of stream "${stream}" cannot go on, and is cancelled: ${reason}`,
              { stream, backfill: backfill.id },
            );
            continue;
          }
        }
        log.warn("backfill.retry", `a backfill of stream "${stream}" failed; trying again`, {
          stream,
          error: errorMessage(error),
        });
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

  /** Writes a watermark with `marks` to the log. */
  async #emit(marks: Omit<Watermark, "stream">): Promise<void> {
    const content: Watermark = { stream: this.#options.stream, ...marks };
    await this.#options.pool.query("SELECT pg_logical_emit_message(true, $1, $2)", [
      WATERMARK_PREFIX,
      JSON.stringify(content),
    ]);
  }

  /** Reads one chunk on the tap's own connection (made again after a failure). */
  async #read(
    read: BackfillTable,
    where: StoredCondition[],
    cursor: string[] | null,
    rows: number,
  ): Promise<Chunk> {
    this.#reader ??= await PgConnection.connect(this.#options.database);
    try {
      return await readChunk(this.#reader, read, where, cursor, {
        rows,
        bytes: this.#limits.bytes,
      });
    } catch (error) {
      void this.#reader.close();
      this.#reader = undefined;
      throw error;
    }
  }

  /** A new step of `backfill`, expected in the log. */
  #newFlight(
    backfill: StoredBackfill,
    schema: string,
    table: string,
    chunk?: { read: BackfillTable; sendStarted: boolean; cursorBefore: string[] | null },
  ): Flight {
    const flight: Flight = {
      nonce: nonce(),
      backfill,
      schema,
      table,
      read: chunk?.read,
      sendStarted: chunk?.sendStarted ?? false,
      cursorBefore: chunk?.cursorBefore ?? null,
      dropped: new Set(),
      truncated: false,
      unknownKey: false,
      reshaped: false,
      done: Promise.withResolvers(),
    };
    if (this.#abort.signal.aborted || this.#ended.has(backfill.id)) {
      // Made while the tap closed (its runner was awaiting): nothing settles it but this.
      flight.done.resolve("abandoned");
    } else {
      this.#flights.set(flight.nonce, flight);
    }
    return flight;
  }

  /** Sends a cancelled backfill's `cancelled`; true when sent. */
  async #cancel(backfill: StoredBackfill): Promise<boolean> {
    this.#track(backfill);
    const flight = this.#newFlight(backfill, backfill.schema, backfill.table);
    await this.#emit({ cancel: flight.nonce });
    if (await flight.done.promise === "abandoned") return false;
    log.info(
      "backfill.cancelled",
      `backfill ${backfill.id} of stream "${backfill.stream}" was cancelled`,
      { stream: backfill.stream, backfill: backfill.id },
    );
    return true;
  }

  /** What the consumer acknowledged of `backfill`, as this run starts from it. */
  #track(backfill: StoredBackfill): Progress {
    let progress = this.#progress.get(backfill.id);
    if (progress === undefined) {
      progress = {
        startedAcked: backfill.startedAcked,
        cursor: backfill.cursor,
        rowsDone: backfill.rowsDone,
        done: false,
        cancelled: false,
      };
      this.#progress.set(backfill.id, progress);
    }
    return progress;
  }

  /**
   * Sends `backfill`'s chunks from its first one not acknowledged, reading
   * up to {@link CHUNKS_AHEAD} ahead of the log; true when its last was sent.
   */
  async #fill(backfill: StoredBackfill): Promise<boolean> {
    const { pool, store } = this.#options;
    const signal = this.#abort.signal;
    const stored = this.#definition.tables.find((t) => t.oid === backfill.tableOid);
    if (stored === undefined) {
      await store.cancel(backfill.stream, backfill.id);
      return false;
    }
    const progress = this.#track(backfill);
    // On a new connection, a `started` not acknowledged is sent again, and with it every chunk:
    // under `replace` the consumer drops its copy when it sees it. On this one, the run goes on
    // after what it sent.
    let sendStarted = false;
    let cursor = this.#sentCursor.get(backfill.id) ?? null;
    if (!this.#sentCursor.has(backfill.id)) {
      sendStarted = !progress.startedAcked;
      cursor = sendStarted ? null : progress.cursor;
      this.#sentRows.set(backfill.id, sendStarted ? 0 : progress.rowsDone);
    }
    const where = [...stored.where, ...backfill.conditions];
    let read = await resolveBackfillTable(pool, stored);
    if (backfill.shape === null) {
      await store.begin(backfill.id, await estimateRows(pool, read, where), read.shape);
    }
    const shape = backfill.shape ?? read.shape;
    let checked = performance.now();
    let generation = this.#generation;
    /** Rows asked for: the limit, or fewer when rows are wide (what fitted the bytes before). */
    let rowLimit = this.#limits.rows;
    /** Chunks read whose high watermark the log has not brought yet. */
    const ahead: Flight[] = [];
    /** The last chunk read: its high watermark is written with the next chunk's low one. */
    let previous: Flight | undefined;
    for (;;) {
      if (signal.aborted || this.#ended.has(backfill.id)) return false;
      if (this.#generation !== generation) {
        // A chunk is to be read again: from its start, and nothing read after it is sent.
        const restart = this.#restart!;
        if (restart.reshaped) {
          await this.#reshaped(backfill, true);
          return true;
        }
        generation = this.#generation;
        cursor = restart.cursor;
        sendStarted = false;
        previous = undefined;
        ahead.length = 0;
      }
      if (performance.now() - checked > CHECK_MS) {
        checked = performance.now();
        const now = await store.get(backfill.stream, backfill.id);
        read = await resolveBackfillTable(pool, stored);
        const running = now?.state === "running" || now?.state === "queued";
        if (!running || read.shape !== shape) {
          // Cancelled meanwhile, or the table's columns changed: what was read is still sent.
          if (previous !== undefined) await this.#emit({ high: previous.nonce });
          await Promise.all(ahead.map((f) => f.done.promise));
          if (this.#generation !== generation) continue;
          if (running) await this.#reshaped(backfill);
          return false;
        }
      }
      const flight = this.#newFlight(backfill, read.schema, read.table, {
        read,
        sendStarted,
        cursorBefore: cursor,
      });
      await this.#emit({ high: previous?.nonce, low: flight.nonce });
      if (this.#generation !== generation) {
        // Given up while its watermark was written (or made after that): it has no rows to send.
        this.#flights.delete(flight.nonce);
        flight.done.resolve("abandoned");
        continue;
      }
      ahead.push(flight);
      flight.rows = await this.#read(read, where, cursor, rowLimit);
      // Rows that did not fit the chunk's bytes are read again with the next: ask for fewer.
      const kept = flight.rows.rows;
      rowLimit = flight.rows.rowsRead > kept
        ? Math.max(MIN_CHUNK_ROWS, Math.ceil(kept * 1.05))
        : Math.min(this.#limits.rows, kept === rowLimit ? rowLimit * 2 : rowLimit);
      sendStarted = false;
      cursor = flight.rows.lastKey;
      previous = flight;
      if (flight.rows.last) {
        await this.#emit({ high: flight.nonce });
        await Promise.all(ahead.map((f) => f.done.promise));
        if (this.#generation !== generation) continue;
        log.info(
          "backfill.sent",
          `backfill ${backfill.id} of stream "${backfill.stream}" sent its last chunk`,
          { stream: backfill.stream, backfill: backfill.id, rows: this.#sentRows.get(backfill.id) },
        );
        return true;
      }
      while (ahead.length >= CHUNKS_AHEAD) await ahead.shift()!.done.promise;
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
      conditions: [],
    });
    log.info(
      "backfill.reshaped",
      `the table of backfill ${backfill.id} changed shape; ${again.id} replaces it`,
      { stream: backfill.stream, backfill: backfill.id, next: again.id, cancelledSent: sent },
    );
  }
}
