/**
 * API v2: named streams, each with its own slot, snapshot, definition and
 * position; its snapshot seen through its definition; its changes to one
 * consumer, and a read-only tail to any number of viewers. Creating,
 * listing and deleting streams, and minting tokens, are for admins; a
 * stream's state, snapshot, changes and tail for whoever may read it.
 * @module
 */

import type { Context, Hono } from "hono";
import type { Principal } from "../auth/principal.ts";
import { mayRead } from "../auth/principal.ts";
import { ConflictError, ForbiddenError, InvalidRequestError, NotFoundError } from "../errors.ts";
import { CONSUMER_ID, type EventListBody, V2_PREFIX } from "../protocol.ts";
import { DEFAULT_EVENT_CAPACITY } from "../observability/event_log.ts";
import { log } from "../observability/log.ts";
import type { HttpHost } from "./host.ts";
import { exportRows } from "../snapshots/snapshot_export.ts";
import { readPage } from "../snapshots/snapshot_reader.ts";
import { readBody } from "./json_body.ts";
import {
  STREAM_NAME_SCHEMA,
  V2_BACKFILL,
  V2_CREATE,
  V2_EXPORT,
  V2_PAGE,
  V2_TOKEN,
  V2_UPDATE,
} from "./request_schemas.ts";
import { admin, json, ndjson, reader, type Routes, signedIn } from "./routes.ts";
import { acceptStream, refuseInvalidated } from "./stream_upgrade.ts";
import { CHECK_INTERVAL_MS } from "../streams/stream_publication.ts";
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

/** The query parameter `name` as a whole number ≥ 0 (`fallback` when absent); a 400 if not. */
function wholeNumber(text: string | undefined, name: string, fallback: number): number {
  if (text === undefined) return fallback;
  if (!/^\d{1,15}$/.test(text)) {
    throw new InvalidRequestError(`Invalid request: "${name}" must be a whole number >= 0`);
  }
  return Number(text);
}

/** When the credential of `principal` expires (its open websockets close then), if it does. */
function expiry(principal: Principal): number | undefined {
  return principal.kind === "anonymous" ? undefined : principal.expiresAt;
}

/** Adds the v2 routes of `server` to `routes`. */
export function v2Routes(server: HttpHost, routes: Routes<Hono>): void {
  const streams = server.streams;
  const base = `${V2_PREFIX}/streams`;

  routes.add(base, {
    // Every stream for an admin; a consumer sees the ones it may read.
    GET: signedIn(async (_c, principal) =>
      json({ streams: (await streams.list()).filter((s) => mayRead(principal, s.name)) })
    ),
    POST: admin(async (c) => {
      server.assertOpen();
      return json(await streams.create(await readBody(c.req.raw, V2_CREATE)), 201);
    }),
  });

  routes.add(`${base}/:name`, {
    GET: reader(async (c) => json(await streams.get(streamName(c)))),
    // Its tables, operations and limits: the new definition takes effect at one position in its log.
    PATCH: admin(async (c) => {
      const name = streamName(c);
      return json(await streams.change(name, await readBody(c.req.raw, V2_UPDATE)));
    }),
    DELETE: admin(async (c) => {
      await streams.delete(streamName(c));
      return new Response(null, { status: 204 });
    }),
  });

  routes.add(`${base}/:name/reset`, {
    // A new slot and snapshot for the same definition: how an invalidated stream comes back.
    POST: admin(async (c) => {
      server.assertOpen();
      return json(await streams.reset(streamName(c)), 201);
    }),
  });

  routes.add(`${base}/:name/backfills`, {
    // Rows of a table (re)sent in the stream's frames, between watermarks: see docs/protocol.md.
    GET: reader(async (c) => json({ backfills: await streams.listBackfills(streamName(c)) })),
    POST: admin(async (c) => {
      server.assertOpen();
      const name = streamName(c);
      return json(await streams.startBackfill(name, await readBody(c.req.raw, V2_BACKFILL)), 202);
    }),
  });

  routes.add(`${base}/:name/backfills/:id`, {
    DELETE: admin(async (c) =>
      json(await streams.cancelBackfill(streamName(c), c.req.param("id")!), 202)
    ),
  });

  routes.add(`${base}/:name/tokens`, {
    POST: admin(async (c) => {
      const name = streamName(c);
      const { ttlSeconds, consumer } = await readBody(c.req.raw, V2_TOKEN);
      if (!server.authenticator.canMint) {
        throw new ConflictError(
          "Cannot mint tokens: the server has no JWT_SECRET to sign them with",
        );
      }
      await streams.require(name, "Cannot mint a token");
      const { token, expiresAt } = await server.authenticator.mint(name, ttlSeconds, consumer);
      return json({ token, expiresAt: expiresAt.toISOString() }, 201);
    }),
  });

  routes.add(`${base}/:name/snapshot`, {
    POST: reader(async (c) => {
      server.assertOpen();
      const name = streamName(c);
      const page = await readBody(c.req.raw, V2_PAGE);
      return json(await readPage(await streams.snapshotSource(name), page), 200, true);
    }),
    DELETE: reader(async (c) => {
      await streams.releaseSnapshot(streamName(c));
      return new Response(null, { status: 204 });
    }),
  });

  routes.add(`${base}/:name/snapshot/export`, {
    POST: reader(async (c) => {
      server.assertOpen();
      const name = streamName(c);
      const page = await readBody(c.req.raw, V2_EXPORT);
      const source = await streams.snapshotSource(name);
      const options = { database: server.config.database, readers: server.config.exportReaders };
      return ndjson(await exportRows(source, options, page));
    }),
  });

  routes.add(`${base}/:name/changes`, {
    GET: reader(async (c, principal) => {
      server.assertOpen();
      const name = streamName(c);
      assertWebSocketHandshake(c.req.raw, "Cannot stream");
      const stream = await streams.require(name, "Cannot stream");
      if (stream.invalidated !== null || await streams.invalidateIfLost(stream)) {
        return refuseInvalidated(c.req.raw, "stream", name);
      }
      const relay = server.relay;
      if (relay !== undefined) {
        // Relay mode: any number of consumers, each with its own id and position in the log. A
        // token that names its consumer acts only as that one: it cannot move another's position
        // or take its lease. Admins, and tokens that name none, choose.
        const asked = c.req.query("consumer");
        const bound = principal.kind === "consumer" ? principal.consumer : undefined;
        if (bound !== undefined && asked !== undefined && asked !== bound) {
          throw new ForbiddenError(
            `Cannot stream: this token may connect only as consumer "${bound}", not "${asked}"`,
          );
        }
        const consumer = bound ?? asked;
        if (consumer === undefined || !CONSUMER_ID.test(consumer)) {
          throw new InvalidRequestError(
            'Cannot stream: give ?consumer=<id> (1 to 64 of A-Z, a-z, 0-9, _ and -; by default the token\'s "consumer" claim, or its "sub")',
          );
        }
        return relay.acceptConsumer(c.req.raw, {
          stream: name,
          consumer,
          startSeq: stream.relayStartSeq,
          expiresAt: expiry(principal),
        });
      }
      const plan = await streams.replicationPlan(stream);
      return acceptStream(c.req.raw, server, {
        stream: name,
        slotName: stream.slotName,
        label: `stream "${name}"`,
        busyTimeoutSeconds: server.config.slotBusyTimeoutSeconds,
        options: plan.options,
        prepare: () => server.slots.syncPublication(),
        observer: { sent: (frame) => server.tails.publish(name, frame.text) },
        expiresAt: expiry(principal),
        monitor: { check: plan.check, intervalMs: CHECK_INTERVAL_MS },
      });
    }),
  });

  routes.add(`${base}/:name/tail`, {
    GET: reader(async (c, principal) => {
      server.assertOpen();
      const name = streamName(c);
      assertWebSocketHandshake(c.req.raw, "Cannot tail");
      const tailed = await streams.require(name, "Cannot tail");
      if (tailed.invalidated !== null) return refuseInvalidated(c.req.raw, "stream", name);
      if (server.relay !== undefined) {
        return server.relay.acceptTail(c.req.raw, name, expiry(principal));
      }
      const { socket, response } = Deno.upgradeWebSocket(c.req.raw);
      server.tails.add(name, socket, expiry(principal));
      return response;
    }),
  });

  routes.add(`${V2_PREFIX}/status`, {
    GET: admin(async () => {
      const report = await server.health();
      return json(report, report.status === "ok" ? 200 : 503);
    }),
  });

  routes.add(`${V2_PREFIX}/events`, {
    // The process's recent events, oldest first; `after` the last id seen, `limit` the newest n.
    GET: admin((c) => {
      const after = wholeNumber(c.req.query("after"), "after", 0);
      const limit = wholeNumber(c.req.query("limit"), "limit", DEFAULT_EVENT_CAPACITY);
      return json({ events: log.events.list(after, limit) } satisfies EventListBody);
    }),
  });

  routes.add(`${V2_PREFIX}/metrics/history`, {
    // The last 15 minutes of each stream's lag, rates and latency: the console's charts.
    GET: admin(() => {
      if (server.metrics === undefined) throw new NotFoundError("Metrics are off (METRICS=off)");
      return json(server.metrics.history());
    }),
  });
}
