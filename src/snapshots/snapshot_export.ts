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

/** The COPY statements of an export: block ranges of every unit, the last one of each open-ended. */
function rangeCopies(select: string, where: string, all: Unit[]): string[] {
  const copies: string[] = [];
  for (const unit of all) {
    for (let from = 0; from === 0 || from < unit.blocks; from += BLOCKS_PER_RANGE) {
      const to = from + BLOCKS_PER_RANGE;
      const upper = to < unit.blocks ? ` AND ctid < '(${to},0)'::tid` : "";
      copies.push(
        `COPY (SELECT ${select} FROM ONLY ${unit.qualified} WHERE ctid >= '(${from},0)'::tid${upper} AND ${where}) TO STDOUT (FORMAT binary)`,
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
 * Turns binary COPY data of one text column into NDJSON lines in chunks.
 * Each COPY starts with a 19-byte header (plus its extension area) and ends
 * with a trailer (-1 fields); in between, each row is its field count
 * (2 bytes), its length (4) and its text, to which a newline is added. Rows
 * may be split across CopyData messages; one instance reads COPY after COPY.
 */
class BinaryRowsToLines {
  #carry: Uint8Array | undefined;
  #header = true;
  #chunk = new Uint8Array(CHUNK_BYTES);
  #used = 0;
  readonly #emit: (chunk: Uint8Array) => Promise<void> | undefined;

  constructor(emit: (chunk: Uint8Array) => Promise<void> | undefined) {
    this.#emit = emit;
  }

  /** Consumes one CopyData payload; returns a promise when the queue asks the reader to wait. */
  push(data: Uint8Array): Promise<void> | undefined {
    let bytes = data;
    if (this.#carry !== undefined) {
      bytes = new Uint8Array(this.#carry.length + data.length);
      bytes.set(this.#carry);
      bytes.set(data, this.#carry.length);
      this.#carry = undefined;
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let pos = 0;
    let wait: Promise<void> | undefined;
    while (pos < bytes.length) {
      if (this.#header) {
        if (bytes.length - pos < 19 || bytes.length - pos < 19 + view.getInt32(pos + 15)) break;
        pos += 19 + view.getInt32(pos + 15);
        this.#header = false;
        continue;
      }
      if (pos + 2 > bytes.length) break;
      if (view.getInt16(pos) === -1) { // the trailer: a next COPY starts with its own header
        pos += 2;
        this.#header = true;
        continue;
      }
      if (pos + 6 > bytes.length) break;
      const length = Math.max(view.getInt32(pos + 2), 0); // -1 (NULL) never comes: rows are objects
      if (pos + 6 + length > bytes.length) break;
      wait = this.#line(bytes, pos + 6, pos + 6 + length) ?? wait;
      pos += 6 + length;
    }
    if (pos < bytes.length) this.#carry = bytes.slice(pos);
    return wait;
  }

  #line(bytes: Uint8Array, start: number, end: number): Promise<void> | undefined {
    const length = end - start;
    let wait: Promise<void> | undefined;
    if (this.#used + length + 1 > this.#chunk.length) {
      wait = this.flush();
      if (length + 1 > this.#chunk.length) this.#chunk = new Uint8Array(length + 1);
    }
    this.#chunk.set(bytes.subarray(start, end), this.#used);
    this.#chunk[this.#used + length] = 0x0a;
    this.#used += length + 1;
    return wait;
  }

  /** Hands over what is buffered. */
  flush(): Promise<void> | undefined {
    if (this.#used === 0) return undefined;
    const full = this.#chunk.subarray(0, this.#used);
    this.#chunk = new Uint8Array(CHUNK_BYTES);
    this.#used = 0;
    return this.#emit(full);
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
    const { table, visible, select, where } = await openViewedTable(
      client,
      source,
      request.table,
      "literals",
    );
    const copies = request.orderBy !== undefined
      ? [
        `COPY (SELECT ${select} FROM ${table.qualified} WHERE ${where}${
          (await sortOrder(client, table, request, visible)).clause
        }) TO STDOUT (FORMAT binary)`,
      ]
      : rangeCopies(select, where, await units(client, table.oid));
    const readers = Math.max(1, Math.min(options.readers, copies.length));
    const queue = new ChunkQueue(2 * readers);
    const ended = new AbortController();
    const stop = (reason: unknown) => {
      if (!ended.signal.aborted) ended.abort(reason);
      queue.wake();
    };
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
        const lines = new BinaryRowsToLines((chunk) => queue.push(chunk));
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
    const reading = Promise.all([...connections].map(read)).then(
      () => queue.wake(),
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
    let done = false;
    ready.resolve(
      new ReadableStream<Uint8Array>({
        start: resetStall,
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
              const reason = ended.signal.reason as Error;
              return controller.error(
                new Error(`Export of ${table.qualified} cut off: ${reason?.message ?? reason}`),
              );
            }
            if (done) {
              clearTimeout(stall);
              return controller.close();
            }
            const data = queue.data;
            await Promise.race([data, reading.then(() => (done = true))]);
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
