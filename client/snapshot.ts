/**
 * "Current rows, then every change" in one call: a v2 stream's snapshot,
 * table by table, page by page (keyset paging on the replica identity where
 * it is one column), then its changes from exactly the snapshot's position.
 * @module
 */

import type { StreamStateBody, StreamTable } from "../src/protocol.ts";
import { ChangeStream, serverUrl, StreamClosedError, type StreamOptions } from "./change_stream.ts";
import { jsonParser } from "./exact_json.ts";

/** A snapshot row: column name → value (numbers as the `numbers` option says). */
export type Row = Record<string, unknown>;

/** What {@link snapshotThenStream} needs besides the stream's options. */
export interface SnapshotOptions extends StreamOptions {
  stream: string;
  /** Called with each page of each table's rows, in order; awaited before the next page. */
  onRows: (table: StreamTable, rows: Row[]) => unknown;
  /** Rows per page (default 5,000). */
  pageSize?: number;
  /** Release the snapshot once read (default true): a held snapshot holds back vacuum. */
  releaseSnapshot?: boolean;
}

/** The `fetch` of `path` at the server, with the credential; a {@link StreamClosedError} for an error answer. */
async function call(
  options: SnapshotOptions,
  method: string,
  path: string,
  body?: unknown,
): Promise<string> {
  const token = typeof options.token === "function" ? await options.token() : options.token;
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  const response = await fetch(new URL(path, serverUrl(options)), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).error ?? text;
    } catch { /* not JSON */ }
    throw new StreamClosedError(response.status, message);
  }
  return text;
}

/**
 * Reads the snapshot of `options.stream` (created with the stream; read it
 * before its time-to-live) through `onRows`, then returns the stream of
 * every change after it. Throws a {@link StreamClosedError} when the server
 * refuses (say, 410: the snapshot is gone; re-create the stream).
 */
export async function snapshotThenStream(options: SnapshotOptions): Promise<ChangeStream> {
  const base = `/v2/streams/${encodeURIComponent(options.stream)}`;
  const state = JSON.parse(await call(options, "GET", base)) as StreamStateBody;
  const parse = jsonParser(options.numbers);
  const exact = jsonParser("string");
  const limit = options.pageSize ?? 5000;
  for (const table of state.tables) {
    const name = `${JSON.stringify(table.schema)}.${JSON.stringify(table.table)}`;
    const key = table.key.length === 1 ? table.key[0] : undefined;
    let cursor: string | undefined;
    let offset = 0;
    for (;;) {
      const page = key === undefined
        ? { table: name, limit, offset }
        : { table: name, limit, order_by: { column: key }, ...(cursor ? { after: cursor } : {}) };
      const text = await call(options, "POST", `${base}/snapshot`, page);
      const rows = parse(text) as Row[];
      if (rows.length > 0) await options.onRows(table, rows);
      if (rows.length < limit) break;
      offset += rows.length;
      if (key !== undefined) {
        // The next page starts after the last key, exactly: take it from an exact parse.
        const last = (exact(text) as Row[])[rows.length - 1][key];
        cursor = typeof last === "string" ? last : JSON.stringify(last);
      }
    }
  }
  if (options.releaseSnapshot ?? true) await call(options, "DELETE", `${base}/snapshot`);
  return new ChangeStream(options);
}
