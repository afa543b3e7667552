/**
 * The seed's API, unchanged for its clients: `init`, the snapshot of the
 * slot init created, and the stream of a slot.
 * @module
 */

import type { Hono } from "hono";
import { InvalidRequestError, NotFoundError } from "../errors.ts";
import { API_PREFIX, CloseCode, type InitResponse } from "../protocol.ts";
import type { HttpHost } from "./host.ts";
import { v1SnapshotOwner } from "../slots/slot_manager.ts";
import { isValidSlotName } from "../slots/slot_names.ts";
import { exportRows } from "../snapshots/snapshot_export.ts";
import { readPage, type SnapshotSource } from "../snapshots/snapshot_reader.ts";
import { readBody } from "./json_body.ts";
import { V1_EXPORT, V1_PAGE } from "./request_schemas.ts";
import { admin, json, ndjson, type Routes } from "./routes.ts";
import { acceptStream, refuseInvalidated } from "./stream_upgrade.ts";
import { assertWebSocketHandshake } from "./websocket_handshake.ts";
import { V1_STREAM_LABEL } from "../observability/metrics.ts";
import { lostSlotReason } from "../streams/stream_manager.ts";

/** The held snapshot of `slotName`: 404 if the slot does not exist, 410 if its snapshot is gone. */
async function snapshotSource(server: HttpHost, slotName: string): Promise<SnapshotSource> {
  if (!server.snapshots.has(slotName) && await server.slots.find(slotName) === undefined) {
    throw new NotFoundError(`Cannot read snapshot: slot "${slotName}" does not exist`);
  }
  const metrics = server.metrics;
  return {
    snapshot: server.snapshots.get(slotName, v1SnapshotOwner(slotName)),
    current: server.pool,
    ownSchema: server.names.schema,
    remedy: v1SnapshotOwner(slotName).remedy,
    // Only where something records them: counting an export's rows scans every chunk.
    countRows: metrics && ((rows) => metrics.snapshotRows(V1_STREAM_LABEL, rows)),
  };
}

/** Adds the v1 routes of `server` to `routes`. */
export function v1Routes(server: HttpHost, routes: Routes<Hono>): void {
  const init = async () => {
    server.assertOpen();
    const slotName = await server.slots.init((slot) =>
      server.sessions.close(slot, CloseCode.SlotDropped, "slot dropped by a new init")
    );
    return json({ slotName } satisfies InitResponse);
  };
  // v1 is admin's: init drops slots. (In protected mode, clients on this machine are admins.)
  routes.add(`${API_PREFIX}/init`, { GET: admin(init, true), POST: admin(init) });

  routes.add(`${API_PREFIX}/snapshot/data`, {
    POST: admin(async (c) => {
      server.assertOpen();
      const page = await readBody(c.req.raw, V1_PAGE);
      return json(await readPage(await snapshotSource(server, page.slotName), page), 200, true);
    }),
  });

  routes.add(`${API_PREFIX}/snapshot/export`, {
    POST: admin(async (c) => {
      server.assertOpen();
      const page = await readBody(c.req.raw, V1_EXPORT);
      const source = await snapshotSource(server, page.slotName);
      const options = { database: server.config.database, readers: server.config.exportReaders };
      return ndjson(await exportRows(source, options, page));
    }),
  });

  routes.add(`${API_PREFIX}/lr/stream`, {
    GET: admin(async (c, principal) => {
      server.assertOpen();
      const slotName = c.req.query("slotName");
      if (!isValidSlotName(slotName)) {
        throw new InvalidRequestError(
          'Cannot stream: query parameter "slotName" is missing or not a slot name',
        );
      }
      assertWebSocketHandshake(c.req.raw, "Cannot stream");
      const lost = () =>
        server.slots.invalidateIfLost(
          slotName,
          (at) => lostSlotReason(slotName, at),
          (slot) => server.sessions.close(slot, CloseCode.StreamInvalidated, "slot invalidated"),
        );
      if (await server.slots.isInvalidated(slotName) || await lost()) {
        return refuseInvalidated(c.req.raw, "slot", slotName);
      }
      return await acceptStream(c.req.raw, server, {
        stream: V1_STREAM_LABEL,
        slotName,
        label: `slot "${slotName}"`,
        busyTimeoutSeconds: server.config.slotBusyTimeoutSeconds,
        options: server.replicationOptions(slotName),
        prepare: async () => {
          const slot = await server.slots.find(slotName);
          if (slot === undefined) {
            throw new NotFoundError(`Cannot stream: slot "${slotName}" does not exist`);
          }
          if (slot.plugin !== "pgoutput") {
            throw new InvalidRequestError(
              `Cannot stream: slot "${slotName}" uses plugin ${slot.plugin}, not pgoutput`,
            );
          }
          await server.slots.syncPublication();
        },
        expiresAt: principal.kind === "admin" ? principal.expiresAt : undefined,
      });
    }),
  });
}
