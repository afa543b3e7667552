/**
 * What the HTTP edge needs of the server, and no more: the parts each route
 * calls, as their types, so that `src/http/` depends on them and not on the
 * composition root (`src/server.ts`), which implements this.
 * @module
 */

import type pg from "pg";
import type { Authenticator } from "../auth/authenticator.ts";
import type { Config } from "../config.ts";
import type { Metrics } from "../observability/metrics.ts";
import type { HealthReport } from "../protocol.ts";
import type { Relay } from "../relay/relay.ts";
import type { ReplicationOptions } from "../replication/replication_service.ts";
import type { SlotManager } from "../slots/slot_manager.ts";
import type { SnapshotStore } from "../snapshots/snapshot_store.ts";
import type { SessionRegistry } from "../streams/session_registry.ts";
import type { StreamManager } from "../streams/stream_manager.ts";
import type { TailHub } from "../streams/tail_hub.ts";

/** The server as its routes use it. */
export interface HttpHost {
  readonly config: Pick<
    Config,
    "auth" | "database" | "exportReaders" | "slotBusyTimeoutSeconds"
  >;
  /** Catalog look-ups outside any snapshot. */
  readonly pool: pg.Pool;
  readonly names: { readonly schema: string };
  readonly snapshots: Pick<SnapshotStore, "has" | "get">;
  readonly slots: Pick<
    SlotManager,
    "init" | "find" | "isInvalidated" | "invalidateIfLost" | "syncPublication"
  >;
  readonly sessions: SessionRegistry;
  readonly tails: Pick<TailHub, "add" | "publish">;
  readonly streams: StreamManager;
  /** Relay mode: consumers and tails of the streams' logs. */
  readonly relay: Pick<Relay, "acceptConsumer" | "acceptTail"> | undefined;
  readonly authenticator: Pick<Authenticator, "canMint" | "mint" | "authenticate">;
  readonly metrics: Metrics | undefined;
  /** Refuses (503) once shutdown has begun. */
  assertOpen(): void;
  /** The database and every slot, and what this server does with each. */
  health(): Promise<HealthReport>;
  /** How a v1 slot's replication is started. */
  replicationOptions(slotName: string): ReplicationOptions;
}
