/**
 * The pgdeltastream client: dependency-free, for Deno, Node 20+ and
 * browsers (bundled as `client/dist/pgdeltastream.js`).
 *
 * ```ts
 * import { connectStream } from "./client/mod.ts";
 * const stream = connectStream({ url: "http://localhost:12312", stream: "orders", token });
 * for await (const tx of stream) apply(tx.changes); // acknowledged once the body completed
 * ```
 * @module
 */

export {
  ChangeStream,
  connectStream,
  FINAL_CLOSE_CODES,
  StreamClosedError,
  type StreamOptions,
  type StreamStatus,
  type TokenSource,
  type Transaction,
} from "./change_stream.ts";
export { jsonParser, type NumberMode } from "./exact_json.ts";
export { type Row, type SnapshotOptions, snapshotThenStream } from "./snapshot.ts";
export type {
  Change,
  RowChange,
  SchemaChange,
  StreamStateBody,
  StreamTable,
  TruncateChange,
} from "../src/protocol.ts";
export { CloseCode } from "../src/protocol.ts";
