/**
 * The wire contract, in one place: HTTP bodies, websocket frames, close codes
 * and limits. `docs/protocol.md` states the invariants behind them.
 * @module
 */

/** API version prefix of every route. */
export const API_PREFIX = "/v1";

/** Body of every error response: HTTP 4xx/5xx and websocket error frames. */
export interface ErrorBody {
  /** What went wrong and, where there is one, what to do about it. */
  error: string;
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
 * One change inside a transaction frame: wal2json format-version 1, byte for
 * byte. Values are JSON numbers (verbatim, never rounded), booleans, `null`
 * or strings in PostgreSQL's text form, so a typed view is only indicative.
 */
export interface Change {
  kind: "insert" | "update" | "delete";
  schema: string;
  table: string;
  columnnames?: string[];
  columntypes?: string[];
  columnvalues?: unknown[];
  oldkeys?: { keynames: string[]; keytypes: string[]; keyvalues: unknown[] };
}

/**
 * Server → client text frame: one committed transaction. `nextlsn` is the
 * end of its commit record; acknowledging it means "this transaction and all
 * before it are consumed".
 */
export interface TransactionFrame {
  nextlsn: string;
  /**
   * Present (true) on every chunk of a large transaction but the last. Such a
   * chunk's `nextlsn` is the previous transaction's, so acking it, as any v1
   * client would, confirms nothing new; the last chunk carries the real one.
   */
  partial?: true;
  change: Change[];
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
  /** The slot was dropped (by a new init); reconnecting to it will fail with 404. */
  SlotDropped: 4000,
  /** The client sent an invalid acknowledgement; the reason says which rule it broke. */
  InvalidAck: 4400,
} as const;

/** A close code from {@link CloseCode}. */
export type CloseCodeValue = typeof CloseCode[keyof typeof CloseCode];
