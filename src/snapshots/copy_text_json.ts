/**
 * `COPY … TO STDOUT` text rows, one per CopyData message, turned into NDJSON
 * row objects byte by byte: each field unescaped from COPY's text format
 * (`\N` for NULL; `\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`) and written
 * with wal2json's rules for its column's type (`replication/wal2json_value.ts`):
 * numbers verbatim (NaN and infinities `null`), booleans, bytea as hex
 * without `\x`, everything else a JSON string exactly as `JSON.stringify`
 * writes it. So an exported row is the same bytes as the `columnvalues` a
 * frame carries, while PostgreSQL only copies: its cheapest way out.
 * @module
 */

import { valueKindOf } from "../replication/wal2json_value.ts";

const encoder = new TextEncoder();
const textDecoder = new TextDecoder();

/** A column of the rows: its JSON-encoded name and how its values are written. */
export interface CopyColumn {
  name: string;
  typeOid: number;
}

const TAB = 0x09;
const NEWLINE = 0x0a;
const BACKSLASH = 0x5c;
const QUOTE = 0x22;

/** The byte a COPY text escape `\x` stands for, by `x`. */
const UNESCAPED = new Uint8Array(128);
UNESCAPED[0x62] = 0x08; // \b
UNESCAPED[0x66] = 0x0c; // \f
UNESCAPED[0x6e] = 0x0a; // \n
UNESCAPED[0x72] = 0x0d; // \r
UNESCAPED[0x74] = 0x09; // \t
UNESCAPED[0x76] = 0x0b; // \v
UNESCAPED[BACKSLASH] = BACKSLASH;

/** How JSON.stringify writes each byte below 0x20, `"` and `\` (empty: as itself). */
const JSON_ESCAPES: Uint8Array[] = Array.from({ length: 128 }, (_, b) => {
  if (b === QUOTE) return encoder.encode('\\"');
  if (b === BACKSLASH) return encoder.encode("\\\\");
  if (b >= 0x20) return new Uint8Array(0);
  return encoder.encode(JSON.stringify(String.fromCharCode(b)).slice(1, -1));
});

const NULL = encoder.encode("null");
const TRUE = encoder.encode("true");
const FALSE = encoder.encode("false");

/** Turns text COPY rows into NDJSON lines in chunks of about `chunkBytes`. */
export class TextRowsToJson {
  /** `{"name":` for the first column, `,"name":` for the others. */
  readonly #heads: Uint8Array[];
  readonly #kinds: ReturnType<typeof valueKindOf>[];
  readonly #chunkBytes: number;
  #chunk: Uint8Array;
  #used = 0;
  readonly #emit: (chunk: Uint8Array) => Promise<void> | undefined;

  /** Rows of `columns`; each full chunk goes to `emit` (a promise: the reader waits). */
  constructor(
    columns: CopyColumn[],
    chunkBytes: number,
    emit: (chunk: Uint8Array) => Promise<void> | undefined,
  ) {
    this.#heads = columns.map((c, i) =>
      encoder.encode(`${i === 0 ? "{" : ","}${JSON.stringify(c.name)}:`)
    );
    this.#kinds = columns.map((c) => valueKindOf(c.typeOid));
    this.#chunkBytes = chunkBytes;
    this.#chunk = new Uint8Array(chunkBytes);
    this.#emit = emit;
  }

  /** Room for `bytes` more, a full chunk handed over first; a promise when the reader must wait. */
  #room(bytes: number): Promise<void> | undefined {
    if (this.#used + bytes <= this.#chunk.length) return undefined;
    const wait = this.flush();
    if (bytes > this.#chunk.length) this.#chunk = new Uint8Array(bytes);
    return wait;
  }

  /**
   * One row (a CopyData payload: the fields, tab-separated, and a newline);
   * returns a promise when the reader should wait for room.
   */
  push(row: Uint8Array): Promise<void> | undefined {
    // A value grows at most six-fold (a control byte as \u00XX); names and punctuation besides.
    let need = 2;
    for (const head of this.#heads) need += head.length + 4;
    const wait = this.#room(need + row.length * 6);
    const out = this.#chunk;
    let o = this.#used;
    let at = 0;
    const end = row.length > 0 && row[row.length - 1] === NEWLINE ? row.length - 1 : row.length;
    for (let column = 0; column < this.#heads.length; column++) {
      const head = this.#heads[column];
      out.set(head, o);
      o += head.length;
      let stop = row.indexOf(TAB, at);
      if (stop === -1 || stop > end) stop = end;
      o = writeField(this.#kinds[column], row, at, stop, out, o);
      at = stop + 1;
    }
    if (this.#heads.length === 0) out[o++] = 0x7b; // { of a row with no columns
    out[o++] = 0x7d; // }
    out[o++] = NEWLINE;
    this.#used = o;
    return wait;
  }

  /** Hands over what is buffered. */
  flush(): Promise<void> | undefined {
    if (this.#used === 0) return undefined;
    const full = this.#chunk.subarray(0, this.#used);
    this.#chunk = new Uint8Array(this.#chunkBytes);
    this.#used = 0;
    return this.#emit(full);
  }
}

/**
 * Writes the COPY text field `row[at, stop)` at `out[o]` as JSON with
 * wal2json's rule for `kind` (`\N` is `null`); returns where it ends. `out`
 * needs room for six bytes a byte of the field, plus five.
 */
export function writeField(
  kind: ReturnType<typeof valueKindOf>,
  row: Uint8Array,
  at: number,
  stop: number,
  out: Uint8Array,
  o: number,
): number {
  if (stop - at === 2 && row[at] === BACKSLASH && row[at + 1] === 0x4e /* N */) {
    out.set(NULL, o);
    return o + 4;
  }
  switch (kind) {
    case "number": {
      const first = row[at];
      // NaN, Infinity and -Infinity have no JSON form: null, as wal2json writes them.
      if (first === 0x4e || first === 0x49 || (first === 0x2d && row[at + 1] === 0x49)) {
        out.set(NULL, o);
        return o + 4;
      }
      for (let i = at; i < stop; i++) out[o++] = row[i];
      return o;
    }
    case "boolean":
      out.set(row[at] === 0x74 ? TRUE : FALSE, o);
      return o + (row[at] === 0x74 ? 4 : 5);
    case "bytea": {
      // COPY writes bytea's \x as \\x; the hex digits need no escaping.
      const from = row[at] === BACKSLASH && row[at + 1] === BACKSLASH && row[at + 2] === 0x78
        ? at + 3
        : at;
      out[o++] = QUOTE;
      out.set(row.subarray(from, stop), o);
      o += stop - from;
      out[o++] = QUOTE;
      return o;
    }
    default:
      return writeString(row, at, stop, out, o);
  }
}

/** A text field `row[at, stop)` as a JSON string at `out[o]`; returns where it ends. */
function writeString(
  row: Uint8Array,
  at: number,
  stop: number,
  out: Uint8Array,
  o: number,
): number {
  out[o++] = QUOTE;
  for (let i = at; i < stop; i++) {
    let b = row[i];
    if (b === BACKSLASH && i + 1 < stop) b = UNESCAPED[row[++i]] || row[i];
    if (b < 0x20 || b === QUOTE || b === BACKSLASH) {
      const escape = JSON_ESCAPES[b];
      out.set(escape, o);
      o += escape.length;
    } else {
      out[o++] = b; // UTF-8 bytes of other characters pass as they are, as JSON.stringify's do
    }
  }
  out[o++] = QUOTE;
  return o;
}

/** The COPY text field `row[at, stop)` unescaped, as a string (`null` for `\N`). */
export function fieldText(row: Uint8Array, at: number, stop: number): string | null {
  if (stop - at === 2 && row[at] === BACKSLASH && row[at + 1] === 0x4e /* N */) return null;
  if (row.subarray(at, stop).indexOf(BACKSLASH) === -1) {
    return textDecoder.decode(row.subarray(at, stop));
  }
  const bytes = new Uint8Array(stop - at);
  let n = 0;
  for (let i = at; i < stop; i++) {
    let b = row[i];
    if (b === BACKSLASH && i + 1 < stop) b = UNESCAPED[row[++i]] || row[i];
    bytes[n++] = b;
  }
  return textDecoder.decode(bytes.subarray(0, n));
}

/** Where the field that starts at `at` of a COPY text row ends (a tab, or `end`). */
export function fieldEnd(row: Uint8Array, at: number, end: number): number {
  // A loop, not indexOf: fields are short, and a Buffer's indexOf costs more to call than to run.
  let i = at;
  while (i < end && row[i] !== TAB) i++;
  return i;
}
