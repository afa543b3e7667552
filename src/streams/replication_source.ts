/**
 * A slot's replication as a consumer session's {@link FrameSource}: the
 * frames the decoder makes, acknowledgements confirmed to PostgreSQL, and a
 * lost connection (or a definition that no longer fits its table) as the
 * close code the consumer gets.
 * @module
 */

import { StreamScopeError } from "../replication/pgoutput_decoder.ts";
import {
  ReplicationLostError,
  type ReplicationService,
} from "../replication/replication_service.ts";
import { CloseCode } from "../protocol.ts";
import { type FrameSource, SourceClosed } from "./consumer_session.ts";

/** `service`'s frames for one consumer; closing the source ends the replication connection. */
export function replicationSource(service: ReplicationService): FrameSource {
  const reader = service.readable.getReader();
  let closed: Promise<void> | undefined;
  return {
    async read() {
      try {
        const result = await reader.read();
        return result.done ? undefined : result.value;
      } catch (error) {
        if (!(error instanceof ReplicationLostError)) throw error;
        if (error.cause instanceof StreamScopeError) {
          throw new SourceClosed(CloseCode.DefinitionBroken, error.cause.message, { cause: error });
        }
        throw new SourceClosed(
          CloseCode.TryAgainLater,
          "replication connection lost; reconnect to resume after your last ack",
          { cause: error.cause },
        );
      }
    },
    acknowledge: (lsn) => service.acknowledge(lsn),
    close() {
      closed ??= (async () => {
        await reader.cancel().catch(() => {});
        await service.close();
      })();
      return closed;
    },
  };
}
