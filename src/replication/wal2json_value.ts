/**
 * wal2json format-version 1's rules for writing one column value as JSON,
 * from PostgreSQL's text output, for the stream. The snapshot applies the
 * same rules in SQL (`snapshot_reader.ts`); a test holds the two to
 * byte-equal rows.
 * @module
 */

/** Type OIDs wal2json writes as bare JSON numbers (verbatim text, never rounded). */
const NUMERIC_TYPES: ReadonlySet<number> = new Set([
  20, // int8
  21, // int2
  23, // int4
  26, // oid
  700, // float4
  701, // float8
  1700, // numeric
]);

/** `bool` type OID: written as JSON `true`/`false`. */
const BOOL_OID = 16;

/** `bytea` type OID: written as hex text without the leading `\x`. */
const BYTEA_OID = 17;

/** JSON literal for SQL NULL. */
export const JSON_NULL = "null";

/** How one type's values are written; chosen once per column, applied per value. */
export type ValueEncoder = (text: string) => string;

const numberEncoder: ValueEncoder = (text) => {
  // NaN, Infinity and -Infinity have no JSON form: wal2json writes null.
  const first = text.charCodeAt(0);
  if (
    first === 78 /* N */ || first === 73 /* I */ ||
    (first === 45 /* - */ && text.charCodeAt(1) === 73)
  ) {
    return JSON_NULL;
  }
  return text;
};

const boolEncoder: ValueEncoder = (text) => (text === "t" ? "true" : "false");

// Hex digits need no escaping; slice(2) drops bytea_output=hex's "\x".
const byteaEncoder: ValueEncoder = (text) => `"${text.startsWith("\\x") ? text.slice(2) : text}"`;

const stringEncoder: ValueEncoder = (text) => JSON.stringify(text);

/** How wal2json writes values of a type: a bare number, a boolean, bytea's hex, or a string. */
export type ValueKind = "number" | "boolean" | "bytea" | "string";

/** The kind of values of type `typeOid` (matched on the OID itself: a domain is a string). */
export function valueKindOf(typeOid: number): ValueKind {
  if (NUMERIC_TYPES.has(typeOid)) return "number";
  if (typeOid === BOOL_OID) return "boolean";
  if (typeOid === BYTEA_OID) return "bytea";
  return "string";
}

const ENCODERS: Record<ValueKind, ValueEncoder> = {
  number: numberEncoder,
  boolean: boolEncoder,
  bytea: byteaEncoder,
  string: stringEncoder,
};

/** The encoder wal2json applies to values of type `typeOid`. */
export function encoderFor(typeOid: number): ValueEncoder {
  return ENCODERS[valueKindOf(typeOid)];
}
