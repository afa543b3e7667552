/**
 * `POST /v1/snapshot/data`: validates the request, resolves the table and
 * sort column against the catalog, and reads one page of rows as of the
 * slot's snapshot. Request input never becomes SQL text: names are looked up
 * and quoted by PostgreSQL itself, numbers are bound.
 * @module
 */

import type pg from "pg";
import { RAW_TEXT_TYPES, SqlState, sqlState } from "./database.ts";
import { HttpError } from "./http_error.ts";
import { DEFAULT_SNAPSHOT_LIMIT, MAX_SNAPSHOT_LIMIT, type SortOrder } from "./protocol.ts";
import { isValidSlotName } from "./slot_names.ts";
import type { HeldSnapshot } from "./snapshots.ts";
import { encoderFor } from "./wal2json_value.ts";

/** A validated snapshot request. */
export interface PageRequest {
  slotName: string;
  table: string;
  offset: number;
  limit: number;
  orderBy?: { column: string; order: SortOrder };
}

const FIELDS = new Set(["slotName", "table", "offset", "limit", "order_by"]);

function count(value: unknown, field: string, fallback: number, min: number, max: number): number {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new HttpError(
      400,
      `Invalid request: "${field}" must be an integer from ${min} to ${max}`,
    );
  }
  return value;
}

function text(value: unknown, field: string): string {
  if (
    typeof value !== "string" || value.length === 0 || value.length > 1024 || value.includes("\0")
  ) {
    throw new HttpError(400, `Invalid request: "${field}" must be a non-empty string`);
  }
  return value;
}

/** Checks the shape of a parsed request body; throws a 400 `HttpError` naming the bad field. */
export function parsePageRequest(body: unknown): PageRequest {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new HttpError(400, "Invalid request: the body must be a JSON object");
  }
  const input = body as Record<string, unknown>;
  const unknown = Object.keys(input).find((k) => !FIELDS.has(k));
  if (unknown !== undefined) {
    throw new HttpError(400, `Invalid request: unknown field ${JSON.stringify(unknown)}`);
  }
  const slotName = text(input.slotName, "slotName");
  if (!isValidSlotName(slotName)) {
    throw new HttpError(400, `Invalid request: "slotName" is not a replication slot name`);
  }
  const request: PageRequest = {
    slotName,
    table: text(input.table, "table"),
    offset: count(input.offset, "offset", 0, 0, Number.MAX_SAFE_INTEGER),
    limit: count(input.limit, "limit", DEFAULT_SNAPSHOT_LIMIT, 1, MAX_SNAPSHOT_LIMIT),
  };
  const orderBy = input.order_by;
  if (orderBy !== undefined && orderBy !== null) {
    if (typeof orderBy !== "object" || Array.isArray(orderBy)) {
      throw new HttpError(
        400,
        `Invalid request: "order_by" must be {"column": "...", "order": "ASC"|"DESC"}`,
      );
    }
    const { column, order = "ASC", ...rest } = orderBy as Record<string, unknown>;
    if (Object.keys(rest).length > 0) {
      throw new HttpError(400, `Invalid request: unknown field order_by.${Object.keys(rest)[0]}`);
    }
    const upper = typeof order === "string" ? order.toUpperCase() : order;
    if (upper !== "ASC" && upper !== "DESC") {
      throw new HttpError(400, `Invalid request: "order_by.order" must be "ASC" or "DESC"`);
    }
    request.orderBy = { column: text(column, "order_by.column"), order: upper };
  }
  return request;
}

interface ResolvedTable {
  oid: number;
  /** `"schema"."table"`, quoted by PostgreSQL's format('%I.%I'). */
  qualified: string;
  relkind: string;
}

/**
 * Finds the relation `name` names: first as PostgreSQL parses it (`schema.table`,
 * quoting, case folding, search_path), then as one exact, visible name
 * (`Mixed Case` without quotes).
 */
async function resolveTable(client: pg.Client, name: string): Promise<ResolvedTable> {
  // to_regclass rejects malformed names (too many dots, bad quoting): "no such table", and a
  // savepoint keeps that error from aborting the snapshot's transaction.
  await client.query("SAVEPOINT resolve");
  const byParse = await client.query("SELECT to_regclass($1)::oid AS oid", [name]).catch(
    async (error: unknown) => {
      if (sqlState(error) === undefined) throw error;
      await client.query("ROLLBACK TO SAVEPOINT resolve");
      return undefined;
    },
  );
  await client.query("RELEASE SAVEPOINT resolve");
  const { rows } = await client.query<ResolvedTable>(
    `SELECT c.oid, format('%I.%I', n.nspname, c.relname) AS qualified, c.relkind::text AS relkind
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
        AND (c.oid = $1 OR ($1 IS NULL AND c.relname = $2 AND pg_table_is_visible(c.oid)))`,
    [byParse?.rows[0]?.oid ?? null, name],
  );
  if (rows.length === 0) {
    throw new HttpError(404, `Cannot read snapshot: table ${JSON.stringify(name)} does not exist`);
  }
  return rows[0];
}

/** The ORDER BY clause: the requested column (checked and quoted), else the primary key, else physical order. */
async function orderClause(
  client: pg.Client,
  table: ResolvedTable,
  request: PageRequest,
): Promise<string> {
  if (request.orderBy !== undefined) {
    const { rows } = await client.query<{ quoted: string }>(
      `SELECT format('%I', attname) AS quoted FROM pg_attribute
        WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped`,
      [table.oid, request.orderBy.column],
    );
    if (rows.length === 0) {
      throw new HttpError(
        404,
        `Cannot read snapshot: column ${
          JSON.stringify(request.orderBy.column)
        } does not exist in ${table.qualified}`,
      );
    }
    return ` ORDER BY ${rows[0].quoted} ${request.orderBy.order}`;
  }
  const { rows } = await client.query<{ key: string | null }>(
    `SELECT string_agg(format('%I', a.attname), ', ' ORDER BY array_position(i.indkey, a.attnum)) AS key
       FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
      WHERE i.indrelid = $1 AND i.indisprimary`,
    [table.oid],
  );
  if (rows[0]?.key) return ` ORDER BY ${rows[0].key}`;
  // Without a key, physical order still makes OFFSET pages disjoint within one snapshot.
  if (table.relkind === "r" || table.relkind === "m") return " ORDER BY ctid";
  if (table.relkind === "p") return " ORDER BY tableoid, ctid";
  return "";
}

/** Reads one page of `request.table` as of `snapshot`, as a JSON array of row objects (text). */
export async function readPage(snapshot: HeldSnapshot, request: PageRequest): Promise<string> {
  try {
    return await snapshot.run(async (client) => {
      const table = await resolveTable(client, request.table);
      const order = await orderClause(client, table, request);
      const result = await client.query({
        text: `SELECT * FROM ${table.qualified}${order} LIMIT $1 OFFSET $2`,
        values: [request.limit, request.offset],
        rowMode: "array",
        types: RAW_TEXT_TYPES,
      });
      return encodeRows(result.fields, result.rows as (string | null)[][]);
    });
  } catch (error) {
    throw mapReadError(error);
  }
}

/** Encodes one row (an array of PostgreSQL text values) as a JSON object, with wal2json's value rules. */
function rowEncoder(fields: pg.FieldDef[]): (row: (string | null)[]) => string {
  const keys = fields.map((f, i) => `${i === 0 ? "{" : ","}${JSON.stringify(f.name)}:`);
  const encoders = fields.map((f) => encoderFor(f.dataTypeID));
  return (row) => {
    let json = "";
    for (let c = 0; c < row.length; c++) {
      const value = row[c];
      json += keys[c] + (value === null ? "null" : encoders[c](value));
    }
    return json + "}";
  };
}

/** `[{"col":value,…},…]`. */
function encodeRows(fields: pg.FieldDef[], rows: (string | null)[][]): string {
  if (fields.length === 0) return `[${rows.map(() => "{}").join(",")}]`;
  return `[${rows.map(rowEncoder(fields)).join(",")}]`;
}

/** Rows fetched from the export cursor per round trip. */
const EXPORT_BATCH_ROWS = 10_000;

/**
 * The whole table as of `snapshot`, as NDJSON (one row object a line), read
 * through a cursor one batch at a time as the client consumes it: memory
 * stays flat and so does the time per row, unlike OFFSET paging. Resolves
 * once the table and sort are resolved (errors then are 4xx); the stream
 * then holds the snapshot's connection until it ends or is cancelled.
 */
export function exportRows(
  snapshot: HeldSnapshot,
  request: PageRequest,
): Promise<ReadableStream<Uint8Array>> {
  const ready = Promise.withResolvers<ReadableStream<Uint8Array>>();
  const finished = Promise.withResolvers<void>();
  const work = snapshot.run(async (client) => {
    const table = await resolveTable(client, request.table);
    const order = await orderClause(client, table, request);
    await client.query(
      `DECLARE export_rows NO SCROLL CURSOR FOR SELECT * FROM ${table.qualified}${order}`,
    );
    const encoder = new TextEncoder();
    let encode: ((row: (string | null)[]) => string) | undefined;
    ready.resolve(
      new ReadableStream<Uint8Array>({
        async pull(controller) {
          try {
            const batch = await client.query({
              text: `FETCH ${EXPORT_BATCH_ROWS} FROM export_rows`,
              rowMode: "array",
              types: RAW_TEXT_TYPES,
            });
            if (batch.rows.length === 0) {
              controller.close();
              finished.resolve();
              return;
            }
            encode ??= rowEncoder(batch.fields);
            controller.enqueue(
              encoder.encode(`${(batch.rows as (string | null)[][]).map(encode).join("\n")}\n`),
            );
          } catch (error) {
            controller.error(error);
            finished.resolve();
          }
        },
        cancel() {
          finished.resolve();
        },
      }, { highWaterMark: 1 }),
    );
    await finished.promise;
    await client.query("CLOSE export_rows");
  });
  work.catch((error) => ready.reject(mapReadError(error)));
  return ready.promise;
}

/** PostgreSQL errors a snapshot read can cause by its input, as 4xx; others unchanged. */
function mapReadError(error: unknown): unknown {
  if (error instanceof HttpError) return error;
  switch (sqlState(error)) {
    case SqlState.InsufficientPrivilege:
      return new HttpError(403, `Cannot read snapshot: ${(error as Error).message}`);
    case SqlState.UndefinedFunction:
      return new HttpError(400, `Cannot read snapshot: ${(error as Error).message}`);
  }
  return error;
}
