/**
 * API v2: named streams, each with its own slot, snapshot, definition and
 * position; its snapshot seen through its definition; its changes to one
 * consumer, and a read-only tail to any number of viewers.
 * @module
 */

import type { Context, Hono } from "hono";
import { InvalidRequestError } from "../errors.ts";
import { V2_PREFIX } from "../protocol.ts";
import type { Server } from "../server.ts";
import { exportRows } from "../snapshots/snapshot_export.ts";
import { readPage } from "../snapshots/snapshot_reader.ts";
import { readBody } from "./json_body.ts";
import { STREAM_NAME_SCHEMA, V2_CREATE, V2_EXPORT, V2_PAGE } from "./request_schemas.ts";
import { json, ndjson, type Routes } from "./routes.ts";
import { acceptStream } from "./stream_upgrade.ts";
import { assertWebSocketHandshake } from "./websocket_handshake.ts";

/** The stream name of the path; a 400 if it cannot be one. */
export function streamName(c: Context): string {
  const name = c.req.param("name");
  if (!STREAM_NAME_SCHEMA.safeParse(name).success) {
    throw new InvalidRequestError(
      `Invalid request: ${
        JSON.stringify(name)
      } is not a stream name (1 to 48 of a-z, 0-9, _ and -)`,
    );
  }
  return name!;
}

/** Adds the v2 routes of `server` to `routes`. */
export function v2Routes(server: Server, routes: Routes<Hono>): void {
  const streams = server.streams;
  const base = `${V2_PREFIX}/streams`;

  routes.add(base, {
    GET: async () => json({ streams: await streams.list() }),
    POST: async (c) => {
      server.assertOpen();
      return json(await streams.create(await readBody(c.req.raw, V2_CREATE)), 201);
    },
  });

  routes.add(`${base}/:name`, {
    GET: async (c) => json(await streams.get(streamName(c))),
    DELETE: async (c) => {
      await streams.delete(streamName(c));
      return new Response(null, { status: 204 });
    },
  });

  routes.add(`${base}/:name/snapshot`, {
    POST: async (c) => {
      server.assertOpen();
      const name = streamName(c);
      const page = await readBody(c.req.raw, V2_PAGE);
      return json(await readPage(await streams.snapshotSource(name), page), 200, true);
    },
    DELETE: async (c) => {
      await streams.releaseSnapshot(streamName(c));
      return new Response(null, { status: 204 });
    },
  });

  routes.add(`${base}/:name/snapshot/export`, {
    POST: async (c) => {
      server.assertOpen();
      const name = streamName(c);
      const page = await readBody(c.req.raw, V2_EXPORT);
      const source = await streams.snapshotSource(name);
      const options = { database: server.config.database, readers: server.config.exportReaders };
      return ndjson(await exportRows(source, options, page));
    },
  });

  routes.add(`${base}/:name/changes`, {
    GET: async (c) => {
      server.assertOpen();
      const name = streamName(c);
      assertWebSocketHandshake(c.req.raw, "Cannot stream");
      const stream = await streams.require(name, "Cannot stream");
      return acceptStream(c.req.raw, server.sessions, {
        slotName: stream.slotName,
        label: `stream "${name}"`,
        busyTimeoutSeconds: server.config.slotBusyTimeoutSeconds,
        options: streams.replicationOptions(stream),
        prepare: () => server.slots.syncPublication(),
        observer: { sent: (frame) => server.tails.publish(name, frame.text) },
      });
    },
  });

  routes.add(`${base}/:name/tail`, {
    GET: async (c) => {
      server.assertOpen();
      const name = streamName(c);
      assertWebSocketHandshake(c.req.raw, "Cannot tail");
      await streams.require(name, "Cannot tail");
      const { socket, response } = Deno.upgradeWebSocket(c.req.raw);
      server.tails.add(name, socket);
      return response;
    },
  });
}
