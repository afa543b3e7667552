/**
 * `POST /v1/snapshot/export`: a whole table as of the snapshot, as NDJSON,
 * read in parallel. PostgreSQL writes each row as the same JSON the pages
 * return; `COPY … TO STDOUT (FORMAT binary)` hands the rows over with no
 * escaping, and the server only strips each row's 6-byte header and adds a
 * newline. Without `order_by` the table is split into ranges of heap blocks
 * (`ctid` ranges, a TID range scan on PostgreSQL 14+) that several readers,
 * each in a transaction that imported the same snapshot, copy one after
 * another; rows then come in no particular order. With `order_by`, one
 * reader copies the table in that order.
 *
 * Memory stays flat: each reader fills chunks of {@link CHUNK_BYTES} into a
 * queue of at most two per reader, and waits (reading nothing from
 * PostgreSQL) while the queue is full. An export whose client reads nothing
 * for {@link STALL_MS} is ended, so that it does not hold the table's lock.
 * @module
 */

import type pg from "pg";
import type { DatabaseConfig } from "../config.ts";
import { PgConnection } from "../postgres/pg_connection.ts";
import { type CopyColumn, TextRowsToJson } from "./copy_text_json.ts";
import {
  mapReadError,
  openViewedTable,
  type PageRequest,
  type SnapshotSource,
  sortOrder,
} from "./snapshot_reader.ts";

/** Heap blocks (8 KiB each) one COPY of a parallel export reads. */
export const BLOCKS_PER_RANGE = 1024;
/** Bytes of NDJSON handed to the HTTP response at a time. */
export const CHUNK_BYTES = 256 << 10;
/** An export whose client reads nothing for this long is ended. */
export const STALL_MS = 60_000;

/** What an export needs besides the snapshot read: where the readers connect, and how many. */
export interface ExportOptions {
  database: DatabaseConfig;
  /** Parallel readers for an export without `order_by`. */
  readers: number;
}

/** How many rows (NDJSON lines) `chunk` holds. */
function lines(chunk: Uint8Array): number {
  let count = 0;
  for (let i = chunk.indexOf(10); i !== -1; i = chunk.indexOf(10, i + 1)) count++;
  return count;
}

/** A table with storage: one unit a range of which one COPY reads. */
interface Unit {
  qualified: string;
  blocks: number;
}

/** The relations with storage of `oid` (itself, or its partitions and inheritance children), with their size in blocks. */
async function units(client: pg.PoolClient, oid: number): Promise<Unit[]> {
  const { rows } = await client.query<{ qualified: string; blocks: string }>(
    `WITH RECURSIVE tree(oid) AS (
       SELECT $1::oid UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
     SELECT format('%I.%I', n.nspname, c.relname) AS qualified,
            (pg_relation_size(c.oid) / current_setting('block_size')::int)::text AS blocks
       FROM tree JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r'
      ORDER BY 1`,
    [oid],
  );
  return rows.map((r: { qualified: string; blocks: string }) => ({
    qualified: r.qualified,
    blocks: Number(r.blocks),
  }));
}

/** The visible columns of `oid` in order: quoted by PostgreSQL, with their type. */
async function copyColumns(
  client: pg.PoolClient,
  oid: number,
  visible: string[] | null,
): Promise<(CopyColumn & { quoted: string })[]> {
  const { rows } = await client.query<{ name: string; quoted: string; type_oid: number }>(
    `SELECT attname::text AS name, format('%I', attname) AS quoted, atttypid::int AS type_oid
       FROM pg_attribute
      WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped
        AND ($2::text[] IS NULL OR attname = ANY ($2::text[]))
      ORDER BY attnum`,
    [oid, visible],
  );
  return rows.map((r: { name: string; quoted: string; type_oid: number }) => ({
    name: r.name,
    quoted: r.quoted,
    typeOid: r.type_oid,
  }));
}

/** The COPY statements of an export: block ranges of every unit, the last one of each open-ended. */
function rangeCopies(select: string, where: string, all: Unit[]): string[] {
  const copies: string[] = [];
  for (const unit of all) {
    for (let from = 0; from === 0 || from < unit.blocks; from += BLOCKS_PER_RANGE) {
      const to = from + BLOCKS_PER_RANGE;
      const upper = to < unit.blocks ? ` AND ctid < '(${to},0)'::tid` : "";
      copies.push(
        `COPY (SELECT ${select} FROM ONLY ${unit.qualified} WHERE ctid >= '(${from},0)'::tid${upper} AND ${where}) TO STDOUT`,
      );
    }
  }
  return copies;
}

/** A bounded queue of NDJSON chunks between the readers and the response. */
class ChunkQueue {
  readonly #chunks: Uint8Array[] = [];
  readonly #capacity: number;
  #space = Promise.withResolvers<void>();
  #data = Promise.withResolvers<void>();

  constructor(capacity: number) {
    this.#capacity = capacity;
  }

  /** Adds a chunk; the promise resolves once there is room for another (now, or later). */
  push(chunk: Uint8Array): Promise<void> | undefined {
    this.#chunks.push(chunk);
    this.#data.resolve();
    if (this.#chunks.length < this.#capacity) return undefined;
    return this.#space.promise;
  }

  /** The next chunk, or undefined when there is none yet. */
  shift(): Uint8Array | undefined {
    const chunk = this.#chunks.shift();
    if (chunk !== undefined && this.#chunks.length < this.#capacity) {
      this.#space.resolve();
      this.#space = Promise.withResolvers<void>();
    }
    if (this.#chunks.length === 0) this.#data = Promise.withResolvers<void>();
    return chunk;
  }

  /** Resolves when a chunk is pushed (or {@link wake} is called). */
  get data(): Promise<void> {
    return this.#data.promise;
  }

  /** Wakes whoever waits for data or for room (the export ended). */
  wake(): void {
    this.#data.resolve();
    this.#space.resolve();
  }
}

/**
 * The whole table as of the snapshot, as NDJSON. Resolves once the table is
 * resolved, locked and found unchanged (errors until then are 4xx); the
 * stream then errors, rather than ending early, if the export is cut off.
 */
export function exportRows(
  source: SnapshotSource,
  options: ExportOptions,
  request: PageRequest,
): Promise<ReadableStream<Uint8Array>> {
  const ready = Promise.withResolvers<ReadableStream<Uint8Array>>();
  const work = source.snapshot.read(async (client, released) => {
    const { table, visible, where } = await openViewedTable(
      client,
      source,
      request.table,
      "literals",
    );
    // PostgreSQL copies the columns as text (its cheapest output); the server writes the JSON.
    const columns = await copyColumns(client, table.oid, visible);
    const select = columns.map((c) => c.quoted).join(", ") || "NULL";
    const copies = request.orderBy !== undefined
      ? [
        `COPY (SELECT ${select} FROM ${table.qualified} WHERE ${where}${
          (await sortOrder(client, table, request, visible)).clause
        }) TO STDOUT`,
      ]
      : rangeCopies(select, where, await units(client, table.oid));
    const readers = Math.max(1, Math.min(options.readers, copies.length));
    const queue = new ChunkQueue(2 * readers);
    const ended = new AbortController();
    /** The response's stream, once it exists: a cut-off errors it at once (see below). */
    let response: ReadableStreamDefaultController<Uint8Array> | undefined;
    const stop = (reason: unknown) => {
      if (!ended.signal.aborted) ended.abort(reason);
      queue.wake();
      // A client that stopped reading leaves no pull waiting to see the cut-off: its response's
      // writer is blocked on the socket. Erroring the stream here ends the response all the same,
      // so that nothing (a shutdown, say) waits on that client.
      try {
        response?.error(cutOff(reason));
      } catch { /* closed already */ }
    };
    const cutOff = (reason: unknown) =>
      new Error(
        `Export of ${table.qualified} cut off: ${(reason as Error)?.message ?? String(reason)}`,
      );
    released.addEventListener("abort", () => stop(released.reason), { once: true });
    const connections = new Set<PgConnection>();
    ended.signal.addEventListener("abort", () => {
      // Cancelled first: a COPY that is cut off stops in PostgreSQL at once, not at its next write.
      for (const connection of connections) void connection.cancel().then(() => connection.close());
    }, { once: true });

    // Readers connect and import the snapshot before the response starts: failing here is a 4xx/5xx.
    const opened = await Promise.allSettled(
      Array.from({ length: readers }, async () => {
        const connection = await PgConnection.connect(options.database);
        connections.add(connection);
        await connection.query(
          `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '${source.snapshot.id}'`,
        );
        return connection;
      }),
    );
    const failed = opened.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed !== undefined) {
      for (const connection of connections) connection.close();
      throw failed.reason;
    }

    let next = 0;
    const read = async (connection: PgConnection) => {
      try {
        const lines = new TextRowsToJson(columns, CHUNK_BYTES, (chunk) => queue.push(chunk));
        while (next < copies.length && !ended.signal.aborted) {
          await connection.copyOut(copies[next++], (data) => lines.push(data));
        }
        await lines.flush();
        await connection.query("COMMIT");
      } finally {
        connections.delete(connection);
        connection.close();
      }
    };
    let done = false;
    const reading = Promise.all([...connections].map(read)).then(
      () => {
        done = true;
        queue.wake();
      },
      (error) => stop(error),
    );

    let stall: ReturnType<typeof setTimeout> | undefined;
    const resetStall = () => {
      clearTimeout(stall);
      stall = setTimeout(
        () =>
          stop(new Error(`the client read nothing for ${STALL_MS / 1000} s, so the export ended`)),
        STALL_MS,
      );
    };
    ready.resolve(
      new ReadableStream<Uint8Array>({
        start: (controller) => {
          response = controller;
          resetStall();
        },
        async pull(controller) {
          resetStall();
          for (;;) {
            const chunk = queue.shift();
            if (chunk !== undefined) {
              if (source.countRows !== undefined) source.countRows(lines(chunk));
              return controller.enqueue(chunk);
            }
            if (ended.signal.aborted) {
              clearTimeout(stall);
              return controller.error(cutOff(ended.signal.reason));
            }
            if (done) {
              clearTimeout(stall);
              return controller.close();
            }
            // Woken by a chunk, or by the end of reading (done) or of the export (aborted); never
            // a race with `reading`, which would leave one reaction on it per wait until it ends.
            await queue.data;
          }
        },
        cancel(reason) {
          clearTimeout(stall);
          stop(reason ?? new Error("the client went away"));
        },
      }, { highWaterMark: 0 }),
    );
    await reading;
    clearTimeout(stall);
    if (ended.signal.aborted) throw ended.signal.reason;
  });
  work.catch((error) => ready.reject(mapReadError(error)));
  return ready.promise;
}
