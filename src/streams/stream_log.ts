/**
 * What a stream needs of a log its frames are kept in beyond the slot
 * (relay mode's JetStream log): a port of `src/streams/`, implemented by
 * `src/relay/`, so that streams never import the relay.
 * @module
 */

import type { CloseCodeValue, StreamStateBody } from "../protocol.ts";

/** A stream's log as `GET /v2/streams/{name}` shows it. */
export type StreamLogState = NonNullable<StreamStateBody["relay"]>;

/** The log of every stream, as the stream manager uses it. */
export interface StreamLog {
  /** Closes the log's consumers and tails of `stream` with `code` and `reason`. */
  close(stream: string, code: CloseCodeValue, reason: string): void;
  /** The stream was reset: its log is emptied; resolves with where the new slot's frames begin. */
  reset(stream: string): Promise<number>;
  /** The stream was deleted: its consumers are told (4000), its log goes. */
  deleted(stream: string): Promise<void>;
  /**
   * The log's state; `walsender` is the `application_name` of the
   * connection streaming the stream's slot (which names its publisher).
   */
  state(stream: string, walsender: string | null): Promise<StreamLogState>;
}
