/**
 * The HTTP and websocket API: routes, handlers, and the one mapper at the
 * edge that turns errors into `{"error": "..."}` responses.
 * @module
 */

import type pg from "pg";
import type { Config } from "./config.ts";
import { createPool, isConnectionError } from "./postgres/database.ts";
import { HttpError } from "./http/http_error.ts";
import {
  API_PREFIX,
  CloseCode,
  type CloseCodeValue,
  type InitResponse,
  MAX_REQUEST_BYTES,
} from "./protocol.ts";
import {
  ReplicationService,
  SlotInUseError,
  SlotNotFoundError,
} from "./replication/replication_service.ts";
import {
  ensureSchema,
  type SchemaNames,
  schemaNames,
  syncPublication,
} from "./postgres/server_schema.ts";
import { type SlotInfo, SlotManager } from "./slots/slot_manager.ts";
import { isValidSlotName } from "./slots/slot_names.ts";
import { exportRows } from "./snapshots/snapshot_export.ts";
import { parsePageRequest, readPage, type SnapshotSource } from "./snapshots/snapshot_reader.ts";
import { SnapshotStore } from "./snapshots/snapshot_store.ts";
import { StreamSession } from "./streams/stream_session.ts";
import { assertWebSocketHandshake } from "./http/websocket_handshake.ts";
import type { ColumnType } from "./replication/pgoutput_decoder.ts";

type Handler = (request: Request, match: URLPatternResult) => Promise<Response>;

interface Route {
  pattern: URLPattern;
  methods: Record<string, Handler>;
}

const JSON_HEADERS = { "content-type": "application/json; charset=utf-8" };

function json(body: string, status = 200): Response {
  return new Response(body, { status, headers: JSON_HEADERS });
}

/** The error mapper: an `HttpError` as the client should see it; anything else a logged 500. */
export function errorResponse(error: unknown): Response {
  if (error instanceof HttpError) {
    return new Response(JSON.stringify({ error: error.message }), {
      status: error.status,
      headers: { ...JSON_HEADERS, ...error.headers },
    });
  }
  if (isConnectionError(error)) {
    return json(
      JSON.stringify({
        error: `Database unavailable (${(error as Error).message}); retry shortly`,
      }),
      503,
    );
  }
  console.error("request failed:", error);
  return json(JSON.stringify({ error: "Internal server error; see the server log" }), 500);
}

/** Reads a JSON body of at most {@link MAX_REQUEST_BYTES}; 400/413/415 `HttpError`s otherwise. */
async function readJson(request: Request): Promise<unknown> {
  const type = request.headers.get("content-type") ?? "application/json";
  if (!/^application\/json\b/i.test(type) && !/^text\/plain\b/i.test(type)) {
    throw new HttpError(
      415,
      `Invalid request: content-type must be application/json, not ${JSON.stringify(type)}`,
    );
  }
  const declared = Number(request.headers.get("content-length") ?? 0);
  if (declared > MAX_REQUEST_BYTES) {
    throw new HttpError(413, `Invalid request: the body is larger than ${MAX_REQUEST_BYTES} bytes`);
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of request.body ?? []) {
    size += chunk.byteLength;
    if (size > MAX_REQUEST_BYTES) {
      throw new HttpError(
        413,
        `Invalid request: the body is larger than ${MAX_REQUEST_BYTES} bytes`,
      );
    }
    chunks.push(chunk);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  const text = new TextDecoder().decode(bytes);
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new HttpError(
      400,
      `Invalid request: the body is not valid JSON (${(error as Error).message})`,
    );
  }
}

/** The server's state: its database pool, held snapshots and open streams. */
export class App implements AsyncDisposable {
  readonly config: Config;
  readonly #pool: pg.Pool;
  readonly #names: SchemaNames;
  readonly #snapshots: SnapshotStore;
  readonly #slots: SlotManager;
  /** Open streams by slot name; `"starting"` reserves a slot while its stream connects. */
  readonly #streams = new Map<string, StreamSession | "starting">();
  readonly #routes: Route[];
  readonly #builtinTypeNames = new Map<string, string>();
  #closing = false;

  private constructor(config: Config, pool: pg.Pool) {
    this.config = config;
    this.#pool = pool;
    this.#names = schemaNames(config.publicationPrefix);
    this.#snapshots = new SnapshotStore(config.database, config.snapshotTtlSeconds);
    this.#slots = new SlotManager(config.database, pool, this.#names, this.#snapshots);
    const init: Handler = () => this.#init();
    this.#routes = [
      {
        pattern: new URLPattern({ pathname: `${API_PREFIX}/init` }),
        methods: { GET: init, POST: init },
      },
      {
        pattern: new URLPattern({ pathname: `${API_PREFIX}/snapshot/data` }),
        methods: { POST: (request) => this.#snapshot(request) },
      },
      {
        pattern: new URLPattern({ pathname: `${API_PREFIX}/snapshot/export` }),
        methods: { POST: (request) => this.#export(request) },
      },
      {
        pattern: new URLPattern({ pathname: `${API_PREFIX}/lr/stream` }),
        methods: { GET: (request) => this.#stream(request) },
      },
      { pattern: new URLPattern({ pathname: "/healthz" }), methods: { GET: () => this.#health() } },
    ];
  }

  /** Snapshots held for init's slots (tests wait on their "release" events). */
  get snapshots(): SnapshotStore {
    return this.#snapshots;
  }

  /** Connects to the database and sets up the server's schema and publications. */
  static async create(config: Config): Promise<App> {
    const pool = createPool(config.database);
    try {
      await ensureSchema(pool, schemaNames(config.publicationPrefix));
    } catch (error) {
      await pool.end();
      throw error;
    }
    return new App(config, pool);
  }

  /** Slots this server's earlier runs created that still exist, with the WAL each holds back. */
  async leftoverSlots(): Promise<string[]> {
    const { rows } = await this.#pool.query<{ line: string }>(
      `SELECT format('%s (%s, holding %s of WAL)', s.slot_name, CASE WHEN s.active THEN 'active' ELSE 'inactive' END,
                     pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn))) AS line
         FROM pg_replication_slots s JOIN ${this.#names.schema}.slots o ON o.slot_name = s.slot_name
        ORDER BY s.slot_name`,
    );
    return rows.map((r: { line: string }) => r.line);
  }

  /** Answers one HTTP request; never throws. */
  handle = async (request: Request): Promise<Response> => {
    try {
      for (const route of this.#routes) {
        const match = route.pattern.exec(request.url);
        if (match === null) continue;
        const handler = route.methods[request.method];
        if (handler === undefined) {
          const allow = Object.keys(route.methods).join(", ");
          throw new HttpError(405, `Method ${request.method} is not allowed here; use ${allow}`, {
            allow,
          });
        }
        return await handler(request, match);
      }
      throw new HttpError(404, `Not found: ${new URL(request.url).pathname}`);
    } catch (error) {
      return errorResponse(error);
    }
  };

  async #init(): Promise<Response> {
    this.#assertOpen();
    const slotName = await this.#slots.init((slot) =>
      this.#closeStream(slot, CloseCode.SlotDropped, "slot dropped by a new init")
    );
    const body: InitResponse = { slotName };
    return json(JSON.stringify(body));
  }

  async #snapshot(request: Request): Promise<Response> {
    this.#assertOpen();
    const page = parsePageRequest(await readJson(request));
    return json(await readPage(await this.#snapshotSource(page.slotName), page));
  }

  async #export(request: Request): Promise<Response> {
    this.#assertOpen();
    const page = parsePageRequest(await readJson(request), "export");
    const source = await this.#snapshotSource(page.slotName);
    const options = { database: this.config.database, readers: this.config.exportReaders };
    return new Response(await exportRows(source, options, page), {
      headers: { "content-type": "application/x-ndjson; charset=utf-8" },
    });
  }

  /** The held snapshot of `slotName`: 404 if the slot does not exist, 410 if its snapshot is gone. */
  async #snapshotSource(slotName: string): Promise<SnapshotSource> {
    if (!this.#snapshots.has(slotName) && await this.#slots.find(slotName) === undefined) {
      throw new HttpError(404, `Cannot read snapshot: slot "${slotName}" does not exist`);
    }
    return {
      snapshot: this.#snapshots.get(slotName),
      current: this.#pool,
      ownSchema: this.#names.schema,
    };
  }

  async #stream(request: Request): Promise<Response> {
    this.#assertOpen();
    const slotName = new URL(request.url).searchParams.get("slotName");
    if (!isValidSlotName(slotName)) {
      throw new HttpError(
        400,
        'Cannot stream: query parameter "slotName" is missing or not a slot name',
      );
    }
    assertWebSocketHandshake(request, "Cannot stream");
    // A client reconnecting right after its socket dropped: let the old session finish first.
    const previous = this.#streams.get(slotName);
    if (previous instanceof StreamSession && previous.ending) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const deadline = new Promise((resolve) => {
        timer = setTimeout(resolve, this.config.slotBusyTimeoutSeconds * 1000);
      });
      await Promise.race([previous.done, deadline]);
      clearTimeout(timer);
    }
    if (this.#streams.has(slotName)) {
      throw new HttpError(
        409,
        `Cannot stream: slot "${slotName}" is already being streamed by another client`,
      );
    }
    this.#streams.set(slotName, "starting");
    try {
      const slot = await this.#slots.find(slotName);
      if (slot === undefined) {
        throw new HttpError(404, `Cannot stream: slot "${slotName}" does not exist`);
      }
      if (slot.plugin !== "pgoutput") {
        throw new HttpError(
          400,
          `Cannot stream: slot "${slotName}" uses plugin ${slot.plugin}, not pgoutput`,
        );
      }
      await syncPublication(this.#pool, this.#names);
      const service = await this.#startReplication(slotName);
      let upgrade;
      try {
        upgrade = Deno.upgradeWebSocket(request);
      } catch (error) {
        await service.close(); // never leave a walsender holding the slot
        throw error;
      }
      const { socket, response } = upgrade;
      const session = new StreamSession(socket, service);
      this.#streams.set(slotName, session);
      void session.done.finally(() => {
        if (this.#streams.get(slotName) === session) this.#streams.delete(slotName);
      });
      return response;
    } catch (error) {
      this.#streams.delete(slotName);
      throw error;
    }
  }

  /**
   * Starts replication, waiting up to the configured time while PostgreSQL
   * still holds the slot for a walsender that is going away (a client that
   * just dropped, a server that crashed).
   */
  async #startReplication(slotName: string): Promise<ReplicationService> {
    const deadline = Date.now() + this.config.slotBusyTimeoutSeconds * 1000;
    for (let delay = 50;; delay = Math.min(delay * 2, 500)) {
      try {
        return await ReplicationService.start({
          database: this.config.database,
          slotName,
          publications: [this.#names.inserts, this.#names.keyed],
          resolveTypes: (types) => this.#typeNames(types),
          skipSchema: (schema) => schema === this.#names.schema,
          chunkBytes: this.config.frameChunkBytes,
        });
      } catch (error) {
        if (error instanceof SlotNotFoundError) throw new HttpError(404, error.message);
        if (!(error instanceof SlotInUseError)) throw error;
        if (Date.now() + delay > deadline) {
          throw new HttpError(409, `${error.message}; retry when it has disconnected`);
        }
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  /** `format_type()` names; built-in types (OID < 16384, never altered) are cached. */
  async #typeNames(types: ColumnType[]): Promise<string[]> {
    const key = (t: ColumnType) => `${t.oid}:${t.typmod}`;
    const missing = types.filter((t) => t.oid >= 16384 || !this.#builtinTypeNames.has(key(t)));
    if (missing.length > 0) {
      const { rows } = await this.#pool.query<{ name: string }>(
        `SELECT format_type(t.oid, nullif(t.typmod, -1)) AS name
           FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, n) ORDER BY t.n`,
        [missing.map((t) => t.oid), missing.map((t) => t.typmod)],
      );
      const fresh = new Map(missing.map((t, i) => [key(t), rows[i].name]));
      for (const t of missing) {
        if (t.oid < 16384) this.#builtinTypeNames.set(key(t), fresh.get(key(t))!);
      }
      return types.map((t) => fresh.get(key(t)) ?? this.#builtinTypeNames.get(key(t))!);
    }
    return types.map((t) => this.#builtinTypeNames.get(key(t))!);
  }

  async #health(): Promise<Response> {
    try {
      const [{ rows }, slots] = await Promise.all([
        this.#pool.query<{ wal_level: string; lsn: string }>(
          "SELECT current_setting('wal_level') AS wal_level, pg_current_wal_lsn()::text AS lsn",
        ),
        this.#slots.list(),
      ]);
      const held = new Set(this.#snapshots.slots());
      return json(
        JSON.stringify({
          status: this.#closing ? "stopping" : "ok",
          database: { reachable: true, walLevel: rows[0].wal_level, currentLsn: rows[0].lsn },
          slots: slots.map((s: SlotInfo) => ({
            slotName: s.slot_name,
            ownedByPgdeltastream: s.owned,
            exists: s.plugin !== null,
            plugin: s.plugin,
            activePid: s.active_pid,
            confirmedFlushLsn: s.confirmed_flush_lsn,
            streaming: this.#streams.has(s.slot_name),
            snapshotHeld: held.has(s.slot_name),
          })),
        }),
        this.#closing ? 503 : 200,
      );
    } catch (error) {
      return json(
        JSON.stringify({
          status: "degraded",
          database: { reachable: false, error: (error as Error).message },
        }),
        503,
      );
    }
  }

  async #closeStream(slotName: string, code: CloseCodeValue, reason: string): Promise<void> {
    const session = this.#streams.get(slotName);
    if (session === undefined || session === "starting") return;
    session.close(code, reason);
    await session.done;
  }

  #assertOpen(): void {
    if (this.#closing) throw new HttpError(503, "The server is shutting down");
  }

  /** Closes every stream with 1001, releases snapshots and connections. Slots are kept. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.#closing = true;
    await Promise.all(
      [...this.#streams.keys()].map((slot) =>
        this.#closeStream(slot, CloseCode.GoingAway, "server shutting down")
      ),
    );
    await this.#snapshots[Symbol.asyncDispose]();
    await this.#pool.end();
  }
}

/** A running server: its address, its state, and a clean shutdown. */
export interface RunningServer extends AsyncDisposable {
  readonly app: App;
  readonly url: URL;
  readonly finished: Promise<void>;
}

/** Starts the API on the configured address; dispose it to shut down gracefully. */
export async function startServer(config: Config): Promise<RunningServer> {
  const app = await App.create(config);
  const listening = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname: config.hostname,
    port: config.port,
    onListen: (addr) => listening.resolve(addr),
  }, app.handle);
  const addr = await listening.promise;
  const host = addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname;
  let stopped: Promise<void> | undefined;
  return {
    app,
    url: new URL(`http://${host}:${addr.port}`),
    finished: server.finished,
    [Symbol.asyncDispose]() {
      stopped ??= (async () => {
        await app[Symbol.asyncDispose]();
        await server.shutdown();
      })();
      return stopped;
    },
  };
}
