/**
 * The wire contract, in one place: HTTP bodies, websocket frames, close codes
 * and limits. `docs/protocol.md` states the invariants behind them.
 * @module
 */

/** Prefix of the seed-compatible v1 routes. */
export const API_PREFIX = "/v1";

/** Prefix of the v2 routes: named streams. */
export const V2_PREFIX = "/v2";

/** Body of every error response: HTTP 4xx/5xx and websocket error frames. */
export interface ErrorBody {
  /** What went wrong and, where there is one, what to do about it. */
  error: string;
}

/** Whether the server's slots can outlive a failover of the database, as far as the primary shows. */
export interface FailoverReadiness {
  /** PostgreSQL 17+: failover slots exist. */
  supported: boolean;
  /** The primary's `synchronized_standby_slots`. */
  synchronizedStandbySlots: string[];
  /** Each of those physical slots: whether it exists, and whether its standby is connected. */
  standbys: { slot: string; exists: boolean; active: boolean }[];
  /** The server's own slots that are not failover slots (yet). */
  notFailover: string[];
  /** Nothing stands in the way. */
  ready: boolean;
  /** What stands in the way, in an operator's words. */
  problems: string[];
}

/** What `GET /v2/status` reports (and `/healthz`, reduced to its status). */
export interface HealthReport {
  status: "ok" | "stopping" | "degraded";
  database: { reachable: boolean; walLevel?: string; currentLsn?: string; error?: string };
  slots?: {
    slotName: string;
    ownedByPgdeltastream: boolean;
    exists: boolean;
    plugin: string | null;
    activePid: number | null;
    confirmedFlushLsn: string | null;
    streaming: boolean;
    snapshotHeld: boolean;
    /** A v1 slot (init's); otherwise a v2 stream's, or not this server's. */
    v1: boolean;
    /** WAL between the current position and the confirmed one: what is not acknowledged yet. */
    lagBytes: number | null;
    /** WAL the slot holds back (from its restart position). */
    retainedBytes: number | null;
    /** v1 slots: standing against the server's limits (`STREAM_MAX_*`). */
    health?: StreamHealth;
    /** v1 slots: when the WAL guard invalidated it. */
    invalidatedAt?: string;
  }[];
  /** Whether the slots can outlive a failover. */
  failover?: FailoverReadiness;
}

/** `GET|POST /v1/init` response. */
export interface InitResponse {
  /** Name of the new logical replication slot: `delta_<word><number>`. */
  slotName: string;
}

/** Sort order of `POST /v1/snapshot/data`. */
export type SortOrder = "ASC" | "DESC";

/** `POST /v1/snapshot/data` request body (the seed's field names). */
export interface SnapshotRequest {
  /** Slot returned by init; its exported snapshot is read. */
  slotName: string;
  /** `table`, `schema.table` or quoted identifiers (`"Mixed Case"`). */
  table: string;
  /** Rows to skip, ≥ 0. */
  offset?: number;
  /** Rows to return, 1 … {@link MAX_SNAPSHOT_LIMIT}. */
  limit?: number;
  /** Sort column and order; defaults to the primary key, else physical order. */
  order_by?: { column: string; order?: SortOrder | Lowercase<SortOrder> };
  /**
   * Keyset paging: return rows whose sort column is after this value (the
   * last row of the previous page). Needs a single sort column; page time
   * then stays flat however deep the page.
   */
  after?: string | number;
}

/** Largest page `POST /v1/snapshot/data` returns. */
export const MAX_SNAPSHOT_LIMIT = 100_000;

/** Page size when the request names none (the seed required one). */
export const DEFAULT_SNAPSHOT_LIMIT = 1_000;

/** Largest HTTP request body accepted. */
export const MAX_REQUEST_BYTES = 1 << 20;

/** Largest websocket message accepted from a client. */
export const MAX_CLIENT_MESSAGE_BYTES = 1 << 20;

/**
 * A row change inside a transaction frame: wal2json format-version 1, byte
 * for byte. Values are JSON numbers (verbatim, never rounded), booleans,
 * `null` or strings in PostgreSQL's text form, so a typed view is only
 * indicative.
 */
export interface RowChange {
  kind: "insert" | "update" | "delete";
  schema: string;
  table: string;
  /** insert, update: the columns written (the stream's, in v2) of the new row. */
  columnnames?: string[];
  columntypes?: string[];
  columnvalues?: unknown[];
  /** update, delete: the replica identity of the old row (among the stream's columns, in v2). */
  oldkeys?: { keynames: string[]; keytypes: string[]; keyvalues: unknown[] };
}

/** v2: the table was truncated (`CASCADE` truncations list every table). */
export interface TruncateChange {
  kind: "truncate";
  schema: string;
  table: string;
}

/**
 * v2: the table's shape from here on: sent before a table's first change in
 * each session, and whenever its columns, types or name change, always
 * ahead of the first change that has the new shape.
 */
export interface SchemaChange {
  kind: "schema";
  schema: string;
  table: string;
  /** The stream's columns of the table, as they are now. */
  columnnames: string[];
  columntypes: string[];
  /** The replica identity among them. */
  keynames: string[];
}

/** How a backfill refills a consumer's copy of a table. */
export type BackfillMode = "replace" | "upsert";

/**
 * v2: a backfill's bounds in the change stream. `started` comes before its
 * first row (under `replace` the consumer drops its copy of the table
 * then); `done` after its last, with the rows it sent; `cancelled` if it was
 * stopped first (a `replace` copy is then incomplete until another one).
 */
export interface BackfillChange {
  kind: "backfill";
  /** The backfill's id, as `POST …/backfills` answered it. */
  id: string;
  schema: string;
  table: string;
  state: "started" | "done" | "cancelled";
  /** `started`: how the consumer applies the rows. */
  mode?: BackfillMode;
  /** `done`: rows sent, all runs together. */
  rows?: number;
  /** `cancelled` by the server: why (its table was dropped, say). */
  reason?: string;
}

/**
 * v2: a table left the stream (`PATCH /v2/streams/{name}` without it): the
 * consumer drops its copy of it, and no change of it comes after.
 */
export interface TableRemovedChange {
  kind: "backfill";
  /** No backfill's: absent. */
  id?: undefined;
  state: "removed";
  schema: string;
  table: string;
}

/**
 * v2: a row of a backfill, as it is at its chunk's closing watermark: an
 * upsert (its values written exactly as an insert's).
 */
export interface ReadChange {
  kind: "read";
  schema: string;
  table: string;
  columnnames: string[];
  columntypes: string[];
  columnvalues: unknown[];
}

/** One entry of a frame's `change` array (v1 frames carry row changes only). */
export type Change =
  | RowChange
  | TruncateChange
  | SchemaChange
  | BackfillChange
  | TableRemovedChange
  | ReadChange;

/**
 * Server → client text frame: one committed transaction. `nextlsn` is the
 * end of its commit record; acknowledging it means "this transaction and all
 * before it are consumed".
 */
export interface TransactionFrame<C extends Change = RowChange> {
  nextlsn: string;
  /**
   * Present (true) on every chunk of a large transaction but the last. Such a
   * chunk's `nextlsn` is the previous transaction's, so acking it, as any v1
   * client would, confirms nothing new; the last chunk carries the real one.
   */
  partial?: true;
  /** The transaction's changes: row changes only in v1; v2 adds truncate and schema changes. */
  change: C[];
}

/** Client → server text frame: acknowledge everything up to and including `lsn`. */
export interface AckMessage {
  /** A `nextlsn` this socket received. */
  lsn: string;
}

/** Websocket close codes this server uses, and whether a client should reconnect. */
export const CloseCode = {
  /** The client closed, or the server closed normally. */
  Normal: 1000,
  /** The server is shutting down; reconnect (to another instance) later. Retryable. */
  GoingAway: 1001,
  /** The client sent a binary frame; only JSON text frames are accepted. */
  UnsupportedData: 1003,
  /** The client sent a message larger than {@link MAX_CLIENT_MESSAGE_BYTES}. */
  MessageTooBig: 1009,
  /** Unexpected server error; reconnect may help. Retryable. */
  InternalError: 1011,
  /** The replication connection to PostgreSQL was lost; reconnect to resume after the last ack. Retryable. */
  TryAgainLater: 1013,
  /** The slot was dropped (by a new init, or the stream deleted); reconnecting will fail with 404. */
  SlotDropped: 4000,
  /** The client sent an invalid acknowledgement; the reason says which rule it broke. */
  InvalidAck: 4400,
  /** The client's credential expired; reconnect with a fresh one to resume after the last ack. */
  TokenExpired: 4401,
  /**
   * v2: the stream's definition no longer fits its table (its filter names a
   * column that was dropped or renamed); the reason names it. Final: delete
   * the stream and create it again, from a fresh snapshot.
   */
  DefinitionBroken: 4422,
  /**
   * The stream (or v1 slot) was invalidated: it held more WAL or was idle
   * longer than its limit, or PostgreSQL invalidated its slot
   * (`max_slot_wal_keep_size`); its slot was dropped, and the changes since
   * the last acknowledgement are lost. Final: `POST /v2/streams/{name}/reset`
   * (v1: a new init), then read the fresh snapshot.
   */
  StreamInvalidated: 4410,
  /**
   * Relay mode: the consumer's position fell out of the stream's log (its
   * retention by age, size or count dropped frames it had not acknowledged).
   * Final: read a fresh snapshot (reset the stream, or create another), then
   * stream with a new consumer id.
   */
  BeyondRetention: 4411,
} as const;

/** Where a backfill is: waiting, reading, finished, being stopped, stopped. */
export type BackfillState = "queued" | "running" | "done" | "cancelling" | "cancelled";

/** `POST /v2/streams/{name}/backfills` request body. */
export interface BackfillRequest {
  /** One of the stream's tables. */
  table: string;
  /** Default `upsert`: repair a consumer's copy; `replace`: the consumer drops it first. */
  mode?: BackfillMode;
  /** Narrows the stream's filter of the table (both apply); its grammar. */
  where?: WhereCondition[];
}

/** A backfill, as `GET /v2/streams/{name}/backfills` lists it and `POST` answers it (202). */
export interface BackfillBody {
  id: string;
  /** `schema.table`. */
  table: string;
  mode: BackfillMode;
  state: BackfillState;
  /** Rows sent and acknowledged so far. */
  rowsDone: number;
  /** PostgreSQL's estimate of the table's rows when it started (`reltuples`); null before. */
  rowsEstimated: number | null;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  /** Why the server cancelled it (its table was dropped, say); absent when a client did. */
  reason?: string;
}

/** `GET /v2/streams/{name}/backfills`: the stream's backfills, oldest first (finished ones for a day). */
export interface BackfillListBody {
  backfills: BackfillBody[];
}

/** A close code from {@link CloseCode}. */
export type CloseCodeValue = typeof CloseCode[keyof typeof CloseCode];

// ---- v2: named streams ------------------------------------------------------------------------

/** A stream name: 1–48 of `[a-z0-9_-]`. */
export const STREAM_NAME = /^[a-z0-9_-]{1,48}$/;

/** Relay mode: a consumer id (`?consumer=`, a token's `consumer` claim): 1–64 of `[A-Za-z0-9_-]`. */
export const CONSUMER_ID = /^[A-Za-z0-9_-]{1,64}$/;

/** Conditions per table of a stream, at most. */
export const MAX_CONDITIONS = 32;

/** Values of one `in` list, at most. */
export const MAX_IN_VALUES = 1000;

/** The kinds of change a stream can carry (all four by default). */
export type StreamOperation = "insert" | "update" | "delete" | "truncate";

/** A row condition: `[column, op, value]`, `[column, "in", [values]]` or `[column, "is null" | "is not null"]`. */
export type WhereCondition =
  | [
    column: string,
    op: "=" | "<>" | "<" | "<=" | ">" | ">=" | "like",
    value: string | number | boolean,
  ]
  | [column: string, op: "in", values: (string | number | boolean)[]]
  | [column: string, op: "is null" | "is not null"];

/** One table of `POST /v2/streams`: a name, or a name with the columns and rows carried. */
export type StreamTableRequest = string | {
  table: string;
  /** Default: every column (also those added later). Must include the replica identity. */
  columns?: string[];
  where?: WhereCondition[];
};

/** How much WAL a stream may hold and how long it may go without a consumer; 0: no limit. */
export interface StreamLimits {
  /** WAL not yet acknowledged (`lagBytes`) the stream may have, in bytes. */
  maxLagBytes: number;
  /** Seconds without a connected consumer. */
  maxIdleSeconds: number;
}

/** `POST /v2/streams` request body. */
export interface CreateStreamRequest {
  name: string;
  tables: StreamTableRequest[];
  operations?: StreamOperation[];
  /** Default: the server's `STREAM_MAX_LAG_BYTES` and `STREAM_MAX_IDLE_SECONDS`. */
  limits?: Partial<StreamLimits>;
  /**
   * How the consumer gets its first copy: `snapshot` (the default), an
   * exported snapshot read over HTTP; or `backfill`, no snapshot held, and a
   * `replace` backfill of every table in its change stream.
   */
  initial?: "snapshot" | "backfill";
}

/** A stream's standing against its limits: `warning` from half of either, `invalidated` past one. */
export type StreamHealth = "ok" | "warning" | "invalidated";

/** A table of a stream, normalized: schema-qualified, columns resolved. */
export interface StreamTable {
  schema: string;
  table: string;
  /** The columns carried, as they are now (every column when the definition names none). */
  columns: string[];
  /** Whether the stream carries every column, including ones added later. */
  allColumns: boolean;
  /** The replica identity (what updates and deletes are keyed by). */
  key: string[];
  /** Conditions, with values as PostgreSQL writes them. */
  where: [string, string, ...unknown[]][];
}

/** A stream as `POST /v2/streams` returns it. */
export interface StreamDefinitionBody {
  /** How its consumer gets its first copy (see {@link CreateStreamRequest.initial}). */
  initial: "snapshot" | "backfill";
  name: string;
  slotName: string;
  tables: StreamTable[];
  operations: StreamOperation[];
  limits: StreamLimits;
  createdAt: string;
}

/** `201` of `POST /v2/streams`. */
export interface CreateStreamResponse extends StreamDefinitionBody {
  /** `initial: "snapshot"`: until when its snapshot is held. */
  snapshot?: { expiresAt: string };
  /** `initial: "backfill"`: the backfill queued for each table. */
  backfills?: { id: string; table: string }[];
}

/** A stream with its state: `GET /v2/streams/{name}` (and each of `GET /v2/streams`). */
export interface StreamStateBody extends StreamDefinitionBody {
  /** A consumer is connected to `changes`. */
  active: boolean;
  /** The position PostgreSQL keeps for the stream: everything up to it was acknowledged. */
  confirmedLsn: string | null;
  /** WAL between the database's current position and `confirmedLsn`: what the slot holds back. */
  lagBytes: number | null;
  /** Whether the snapshot of the stream's creation can still be read. */
  snapshotHeld: boolean;
  /** When that snapshot is released, while it is held. */
  snapshotExpiresAt?: string;
  /** Read-only tails connected. */
  tails: number;
  /** Standing against the limits. */
  health: StreamHealth;
  /** WAL the slot holds back (its restart position to the database's), in bytes. */
  retainedBytes: number | null;
  /** When a consumer was last connected (the idle clock starts there). */
  lastActivityAt: string;
  /**
   * The consumer this instance serves, while one is connected: since when,
   * and how long the oldest frame it was sent and has not acknowledged has
   * been committed (0: it acknowledged everything it was sent).
   */
  consumer?: { connectedAt: string; unackedSeconds: number };
  /** Its backfills not finished yet (queued, running, cancelling), oldest first. */
  backfills: BackfillBody[];
  /** Why and when the stream was invalidated, when it was. */
  invalidated?: { at: string; reason: string };
  /**
   * What the stream waits for, when PostgreSQL holds its changes back: a
   * standby of `synchronized_standby_slots` that is not connected.
   */
  waitingFor?: string;
  /** Relay mode: the instance publishing it, its log, and each consumer's standing in it. */
  relay?: {
    publisher: string | null;
    log: { messages: number; bytes: number; firstSeq: number; lastSeq: number } | null;
    /**
     * Each consumer id: frames not yet acknowledged, the log sequence acknowledged up to, and
     * the instance holding its lease (serving its socket) — null while none is connected.
     */
    consumers: { id: string; pending: number; ackFloor: number; leasedBy: string | null }[];
  };
}

/** One event: its place in the ring, when, how serious, its name, message and fields. */
export interface ServerEvent {
  /** Increasing from 1: `?after=` the last one seen asks for the newer ones. */
  id: number;
  /** ISO 8601, UTC. */
  time: string;
  /** The log line's level (`debug` lines are not kept). */
  level: "info" | "warn" | "error";
  /** The log line's event name: `consumer.connected`, `stream.invalidated`, … */
  event: string;
  message: string;
  fields: Record<string, string | number | boolean | null>;
}

/** `GET /v2/events` (admin): the process's recent events, oldest first. */
export interface EventListBody {
  events: ServerEvent[];
}

/** One stream's figures over one interval of the metric history. */
export interface StreamSample {
  /** Slot lag at the end of the interval (null: no slot). */
  lagBytes: number | null;
  changesPerSecond: number;
  bytesPerSecond: number;
  /** Commit to socket, of the frames sent in the interval (null: none were). */
  latencyP50Ms: number | null;
  latencyP99Ms: number | null;
}

/** The figures of every stream (v1 slots: `v1`) at the end of one interval. */
export interface HistorySample {
  /** ISO 8601, UTC. */
  time: string;
  streams: Record<string, StreamSample>;
}

/** `GET /v2/metrics/history` (admin): the last samples, oldest first. */
export interface MetricHistoryBody {
  intervalSeconds: number;
  samples: HistorySample[];
}

/** `GET /v2/streams`. */
export interface StreamListBody {
  streams: StreamStateBody[];
}
