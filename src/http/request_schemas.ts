/**
 * Request bodies, each declared once: a zod schema that validates and
 * normalizes it, and the message a client reads when a field is wrong
 * (keyed by the field's path; `*` stands for any array index). A body that
 * fails gets the message of its first bad field, as a 400.
 * @module
 */

import { z } from "zod";
import { InvalidRequestError } from "../errors.ts";
import {
  CONSUMER_ID,
  DEFAULT_SNAPSHOT_LIMIT,
  MAX_CONDITIONS,
  MAX_IN_VALUES,
  MAX_SNAPSHOT_LIMIT,
  type SortOrder,
  STREAM_NAME,
} from "../protocol.ts";
import { OPERATORS } from "../replication/row_filter.ts";
import { isValidSlotName } from "../slots/slot_names.ts";
import type { RequestCondition } from "../streams/stream_definition.ts";
import type { ChangeStream, CreateStream, StartBackfill } from "../streams/stream_manager.ts";
import { JsonNumber } from "./json_number.ts";

/** A request body's schema and the messages for its fields. */
export interface RequestSchema<T> {
  zod: z.ZodType<T>;
  /** Field path (`order_by.order`, `tables.*.where`) → what the field must be. */
  messages: Record<string, string>;
  /** The message for a field the schema does not know. */
  unknownField?: (path: string) => string;
}

/** `a.0.b` as a client reads it: `a[0].b`. */
function displayPath(path: PropertyKey[]): string {
  return path.map((p, i) => typeof p === "number" ? `[${p}]` : `${i ? "." : ""}${String(p)}`)
    .join("");
}

/** The message declared for `path`, or for its nearest parent that has one. */
function messageFor(messages: Record<string, string>, path: PropertyKey[]): string | undefined {
  for (let end = path.length; end > 0; end--) {
    const key = path.slice(0, end).map((p) => typeof p === "number" ? "*" : String(p)).join(".");
    if (messages[key] !== undefined) return messages[key];
  }
  return undefined;
}

/** Checks `body` against `schema`; throws an {@link InvalidRequestError} naming the first bad field. */
export function parseRequest<T>(schema: RequestSchema<T>, body: unknown): T {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new InvalidRequestError("Invalid request: the body must be a JSON object");
  }
  const result = schema.zod.safeParse(body);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  if (issue.code === "unrecognized_keys") {
    const path = displayPath([...issue.path, issue.keys[0]]);
    throw new InvalidRequestError(
      schema.unknownField?.(path) ?? `Invalid request: unknown field ${JSON.stringify(path)}`,
    );
  }
  if (issue.code === "custom" && issue.params?.explicit) {
    throw new InvalidRequestError(`Invalid request: ${issue.message}`);
  }
  const declared = messageFor(schema.messages, issue.path);
  const field = displayPath(issue.path);
  throw new InvalidRequestError(
    declared !== undefined
      ? `Invalid request: ${declared}`
      : `Invalid request: ${field ? `"${field}": ` : ""}${issue.message}`,
  );
}

/** An issue whose message is the one the client reads (a rule across fields, say). */
export function explicit(path: PropertyKey[], message: string) {
  return { code: "custom" as const, path, message, params: { explicit: true } };
}

/** A string a name can be: non-empty, at most 1,024 characters, no NUL. */
const name = z.string().min(1).max(1024).refine((s) => !s.includes("\0"));

/** `null` means absent, as the seed's clients send it. */
const optional = <T extends z.ZodType>(schema: T) =>
  schema.nullish().transform((v) => v ?? undefined);

const ORDER_BY = z.strictObject({
  column: name,
  order: optional(
    z.string().transform((s) => s.toUpperCase()).pipe(z.enum(["ASC", "DESC"])),
  ),
}).transform(({ column, order }) => ({ column, order: (order ?? "ASC") as SortOrder }));

/** `after`: a key value, as a string (a safe integer is accepted and kept exact). */
const AFTER = z.union([z.string(), z.number().int().refine(Number.isSafeInteger)]).transform(
  String,
);

const SNAPSHOT_MESSAGES = {
  table: '"table" must be a non-empty string',
  offset: `"offset" must be an integer from 0 to ${Number.MAX_SAFE_INTEGER}`,
  limit: `"limit" must be an integer from 1 to ${MAX_SNAPSHOT_LIMIT}`,
  order_by: '"order_by" must be {"column": "...", "order": "ASC"|"DESC"}',
  "order_by.column": '"order_by.column" must be a non-empty string',
  "order_by.order": '"order_by.order" must be "ASC" or "DESC"',
  after: '"after" must be a string or a safe integer (send large numbers as strings)',
};

/** The fields of a page of a snapshot: table, paging and order. */
const PAGE_FIELDS = {
  table: name,
  offset: optional(z.number().int().min(0).max(Number.MAX_SAFE_INTEGER)),
  limit: optional(z.number().int().min(1).max(MAX_SNAPSHOT_LIMIT)),
  order_by: optional(ORDER_BY),
  after: optional(AFTER),
};

/** A page request as the snapshot readers take it. */
export interface PageRequestBody {
  table: string;
  offset: number;
  limit: number;
  orderBy?: { column: string; order: SortOrder };
  after?: string;
}

function toPage(
  body: {
    table: string;
    offset?: number;
    limit?: number;
    order_by?: { column: string; order: SortOrder };
    after?: string;
  },
  context: z.RefinementCtx,
): PageRequestBody {
  if (body.after !== undefined && (body.offset ?? 0) !== 0) {
    context.addIssue(explicit(["after"], 'use "after" or "offset", not both'));
  }
  return {
    table: body.table,
    offset: body.offset ?? 0,
    limit: body.limit ?? DEFAULT_SNAPSHOT_LIMIT,
    orderBy: body.order_by,
    after: body.after,
  };
}

const SLOT_NAME = z.string().refine(isValidSlotName);

/** `POST /v1/snapshot/data`. */
export const V1_PAGE: RequestSchema<PageRequestBody & { slotName: string }> = {
  zod: z.strictObject({ slotName: SLOT_NAME, ...PAGE_FIELDS }).transform((body, context) => ({
    slotName: body.slotName,
    ...toPage(body, context),
  })),
  messages: {
    ...SNAPSHOT_MESSAGES,
    slotName: '"slotName" must be the name of a replication slot (a-z, 0-9, _)',
  },
};

const EXPORT_UNKNOWN = (v1: boolean) => (path: string) =>
  path in PAGE_FIELDS
    ? `Invalid request: export streams the whole table; ${JSON.stringify(path)} is for ${
      v1 ? "/v1/snapshot/data" : "the snapshot endpoint"
    }`
    : `Invalid request: unknown field ${JSON.stringify(path)}`;

/** `POST /v1/snapshot/export`: the whole table, so nothing that pages. */
export const V1_EXPORT: RequestSchema<PageRequestBody & { slotName: string }> = {
  zod: z.strictObject({ slotName: SLOT_NAME, table: name, order_by: optional(ORDER_BY) })
    .transform((body, context) => ({ slotName: body.slotName, ...toPage(body, context) })),
  messages: V1_PAGE.messages,
  unknownField: EXPORT_UNKNOWN(true),
};

// ---- v2 ---------------------------------------------------------------------------------------

/** A v2 stream name in a path or a body. */
export const STREAM_NAME_SCHEMA = z.string().regex(STREAM_NAME);

const OPERATION = z.enum(["insert", "update", "delete", "truncate"]);

/** A condition's value: a JSON string, number (digits kept) or boolean. */
const VALUE = z.union([z.string(), z.number(), z.boolean(), z.instanceof(JsonNumber)]);

/**
 * `[column, op, value]`, `[column, "in", [values]]` or `[column, "is null" |
 * "is not null"]`, checked op by op so that the message says what is wrong.
 */
const CONDITION = z.tuple([name, z.enum(OPERATORS)], z.unknown()).superRefine((c, context) => {
  const [, op, ...rest] = c;
  const wrong = (message: string) => context.addIssue(explicit([], message));
  if (op === "is null" || op === "is not null") {
    if (rest.length !== 0) wrong(`"${op}" takes no value: [column, "${op}"]`);
  } else if (op === "in") {
    const values = rest[0];
    if (rest.length !== 1 || !Array.isArray(values) || values.length === 0) {
      wrong('"in" takes a non-empty list: [column, "in", [values]]');
    } else if (values.length > MAX_IN_VALUES) {
      wrong(`"in" takes at most ${MAX_IN_VALUES} values`);
    } else if (!values.every((v) => VALUE.safeParse(v).success)) {
      wrong('the values of "in" must be strings, numbers or booleans');
    }
  } else if (rest.length !== 1 || !VALUE.safeParse(rest[0]).success) {
    wrong(`"${op}" takes one value (a string, number or boolean): [column, "${op}", value]`);
  } else if (op === "like" && typeof rest[0] !== "string") {
    wrong('"like" takes a string pattern');
  }
}).transform((c) => c as unknown as RequestCondition);

const STREAM_TABLE = z.preprocess(
  (table) => typeof table === "string" ? { table } : table,
  z.strictObject({
    table: name,
    columns: optional(z.array(name).min(1).max(1600)),
    where: optional(z.array(CONDITION).max(MAX_CONDITIONS)),
  }),
);

/** A stream's limits, either or both. */
const LIMITS = z.strictObject({
  maxLagBytes: optional(z.number().int().min(0).max(Number.MAX_SAFE_INTEGER)),
  maxIdleSeconds: optional(z.number().int().min(0).max(10 * 365 * 86400)),
});

/** What a request says of limits that is wrong. */
const LIMITS_MESSAGES = {
  limits:
    '"limits" must be {"maxLagBytes"?, "maxIdleSeconds"?}, each a whole number >= 0 (0: no limit)',
  "limits.maxLagBytes": '"maxLagBytes" must be a whole number of bytes >= 0 (0: no limit)',
  "limits.maxIdleSeconds": '"maxIdleSeconds" must be a whole number of seconds >= 0 (0: no limit)',
};

/** `POST /v2/streams`. */
export const V2_CREATE: RequestSchema<CreateStream> = {
  zod: z.strictObject({
    name: STREAM_NAME_SCHEMA,
    tables: z.array(STREAM_TABLE).min(1).max(1000),
    operations: optional(z.array(OPERATION).min(1)),
    limits: optional(LIMITS),
    initial: optional(z.enum(["snapshot", "backfill"])),
  }).transform((body) => ({
    name: body.name,
    tables: body.tables,
    limits: body.limits ?? {},
    initial: body.initial ?? "snapshot",
    operations: body.operations === undefined
      ? ["insert", "update", "delete", "truncate"]
      : [...new Set(body.operations)],
  })),
  messages: {
    name: '"name" must be 1 to 48 of a-z, 0-9, _ and -',
    tables:
      '"tables" must be a list of 1 to 1000 tables: names, or {"table", "columns"?, "where"?}',
    "tables.*.table": '"table" must be a non-empty string',
    "tables.*.columns": '"columns" must be a non-empty list of column names',
    "tables.*.where": `"where" must be a list of at most ${MAX_CONDITIONS} conditions, each ` +
      '[column, op, value], [column, "in", [values]] or [column, "is null" | "is not null"], ' +
      `op one of ${OPERATORS.join(", ")}`,
    operations: '"operations" must be a non-empty list of insert, update, delete, truncate',
    initial: '"initial" must be "snapshot" (the default) or "backfill"',
    ...LIMITS_MESSAGES,
  },
};

/**
 * `PATCH /v2/streams/{name}`: what may change of a running stream: its
 * tables (the full new list), its operations, its limits; `backfill: false`
 * skips the backfills of the tables added or changed.
 */
export const V2_UPDATE: RequestSchema<ChangeStream> = {
  zod: z.strictObject({
    tables: optional(z.array(STREAM_TABLE).min(1).max(1000)),
    operations: optional(z.array(OPERATION).min(1)),
    limits: optional(LIMITS),
    backfill: optional(z.boolean()),
  }).refine(
    (body) =>
      body.tables !== undefined || body.operations !== undefined || body.limits !== undefined,
    explicit([], 'give at least one of "tables", "operations" and "limits"'),
  ).transform((body) => ({
    ...(body.tables === undefined ? {} : { tables: body.tables }),
    ...(body.operations === undefined ? {} : { operations: [...new Set(body.operations)] }),
    ...(body.limits === undefined ? {} : { limits: body.limits }),
    backfill: body.backfill ?? true,
  })),
  messages: {
    tables: V2_CREATE.messages.tables,
    "tables.*.table": V2_CREATE.messages["tables.*.table"],
    "tables.*.columns": V2_CREATE.messages["tables.*.columns"],
    "tables.*.where": V2_CREATE.messages["tables.*.where"],
    operations: V2_CREATE.messages.operations,
    backfill: '"backfill" must be true (the default) or false',
    ...LIMITS_MESSAGES,
  },
};

/** `POST /v2/streams/{name}/backfills`. */
export const V2_BACKFILL: RequestSchema<StartBackfill> = {
  zod: z.strictObject({
    table: name,
    mode: optional(z.enum(["replace", "upsert"])),
    where: optional(z.array(CONDITION).max(MAX_CONDITIONS)),
  }).transform((body) => ({
    table: body.table,
    mode: body.mode ?? "upsert",
    where: body.where ?? [],
  })),
  messages: {
    table: '"table" must be the name of one of the stream\'s tables',
    mode: '"mode" must be "upsert" (the default) or "replace"',
    where: `"where" must be a list of at most ${MAX_CONDITIONS} conditions, each ` +
      '[column, op, value], [column, "in", [values]] or [column, "is null" | "is not null"], ' +
      `op one of ${OPERATORS.join(", ")}`,
  },
};

/** `POST /v2/streams/{name}/snapshot`. */
export const V2_PAGE: RequestSchema<PageRequestBody> = {
  zod: z.strictObject(PAGE_FIELDS).transform((body, context) => toPage(body, context)),
  messages: SNAPSHOT_MESSAGES,
};

/** `POST /v2/streams/{name}/snapshot/export`. */
export const V2_EXPORT: RequestSchema<PageRequestBody> = {
  zod: z.strictObject({ table: name, order_by: optional(ORDER_BY) })
    .transform((body, context) => toPage(body, context)),
  messages: SNAPSHOT_MESSAGES,
  unknownField: EXPORT_UNKNOWN(false),
};

/** Longest life of a minted token: a week. */
export const MAX_TOKEN_TTL_SECONDS = 7 * 24 * 3600;

/** `POST /v2/streams/{name}/tokens`. */
export const V2_TOKEN: RequestSchema<{ ttlSeconds: number; consumer?: string }> = {
  zod: z.strictObject({
    ttlSeconds: optional(z.number().int().min(1).max(MAX_TOKEN_TTL_SECONDS)),
    consumer: optional(z.string().regex(CONSUMER_ID)),
  }).transform((body) => ({ ttlSeconds: body.ttlSeconds ?? 3600, consumer: body.consumer })),
  messages: {
    ttlSeconds: `"ttlSeconds" must be an integer from 1 to ${MAX_TOKEN_TTL_SECONDS}`,
    consumer: '"consumer" must be a consumer id: 1 to 64 of A-Z, a-z, 0-9, _ and -',
  },
};
