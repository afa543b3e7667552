/**
 * Decodes pgoutput (protocol version 1) messages into transaction frames in
 * wal2json format-version 1, as JSON text built directly from PostgreSQL's
 * text output: no parse/stringify round trip, so numbers stay verbatim.
 *
 * Message layouts: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
 * @module
 */

import { Buffer } from "node:buffer";
import type { Lsn } from "../lsn.ts";
import { formatLsnAt, readLsn } from "../lsn.ts";
import { encoderFor, JSON_NULL, type ValueEncoder } from "./wal2json_value.ts";

/** A committed transaction, or one chunk of a large one, ready to send. */
export interface Frame {
  /** `{"nextlsn":"X/Y","change":[...]}`; a non-final chunk adds `"partial":true`. */
  readonly text: string;
  /**
   * The position an ack of this frame confirms: the end of the transaction's
   * commit record, or for a non-final chunk the previous frame's (acking it
   * changes nothing: the transaction is not consumed until its last chunk).
   */
  readonly nextLsn: Lsn;
  /** Number of changes in the frame. */
  readonly changes: number;
  /** True for every chunk of a large transaction but the last. */
  readonly partial: boolean;
}

/** Default size at which a transaction's changes are sent as a partial frame. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;

/** One column's type as pgoutput's Relation message describes it. */
export interface ColumnType {
  oid: number;
  typmod: number;
}

/** Resolves type OIDs and modifiers to `format_type()` names, e.g. `character varying(20)`. */
export type TypeNameResolver = (types: ColumnType[]) => Promise<string[]>;

/** Schemas whose changes are never streamed: the server's own bookkeeping. */
export type SchemaFilter = (schema: string) => boolean;

interface Relation {
  /** Changes to this relation are dropped (server-internal schema). */
  skip: boolean;
  names: string[];
  /** JSON-encoded column names and type names, ready to join. */
  jsonNames: string[];
  jsonTypes: string[];
  encoders: ValueEncoder[];
  /** Indexes of replica identity columns (all of them for REPLICA IDENTITY FULL). */
  keyIndexes: number[];
  /** `{"kind":"insert","schema":…,"table":…` (and update/delete variants). */
  insertHead: string;
  updateHead: string;
  deleteHead: string;
  /** `,"columnnames":[…],"columntypes":[…],"columnvalues":[` for a tuple with every column. */
  allColumns: string;
  /** `,"oldkeys":{"keynames":[…],"keytypes":[…],"keyvalues":[` */
  oldKeysHead: string;
}

/** Marks a column whose TOASTed value did not change: wal2json leaves it out. */
const UNCHANGED = undefined;
type TupleValues = (string | typeof UNCHANGED)[];

const TAG_BEGIN = 0x42; // B
const TAG_COMMIT = 0x43; // C
const TAG_RELATION = 0x52; // R
const TAG_INSERT = 0x49; // I
const TAG_UPDATE = 0x55; // U
const TAG_DELETE = 0x44; // D

/** Decoder state for one replication connection: relations seen and the open transaction. */
export class PgoutputDecoder {
  readonly #relations = new Map<number, Relation>();
  readonly #resolveTypes: TypeNameResolver;
  readonly #skipSchema: SchemaFilter;
  readonly #chunkBytes: number;
  #changes: string[] = [];
  #bytes = 0;
  #chunked = false;
  #inTransaction = false;
  /** nextlsn of the last complete transaction sent: what a partial frame carries. */
  #lastEnd: Lsn = 0n;
  #lastEndText = "0/0";

  /**
   * Message tag → handler. A handler returns a `Frame` when a transaction
   * completes, a promise when it must look something up first (new relation).
   * Tags not listed are ignored: Origin, Type, Truncate and Message carry
   * nothing wal2json format-version 1 prints.
   */
  readonly #handlers: Record<
    number,
    (buf: Buffer, view: DataView) => Frame | Promise<void> | void
  > = {
    // Begin: a transaction's changes follow, up to its Commit.
    [TAG_BEGIN]: () => {
      this.#changes = [];
      this.#bytes = 0;
      this.#chunked = false;
      this.#inTransaction = true;
    },
    // Commit: flags(1) commit_lsn(8) end_lsn(8) timestamp(8). end_lsn is wal2json's nextlsn.
    [TAG_COMMIT]: (_buf, view) => this.#commit(view),
    // Relation: describes a table before its first change in this session, and after DDL.
    [TAG_RELATION]: (buf, view) => this.#relation(buf, view),
    // Insert: relid(4) 'N' tuple.
    [TAG_INSERT]: (buf, view) => this.#insert(buf, view),
    // Update: relid(4) ['K'|'O' old tuple] 'N' new tuple.
    [TAG_UPDATE]: (buf, view) => this.#update(buf, view),
    // Delete: relid(4) 'K'|'O' old tuple.
    [TAG_DELETE]: (buf, view) => this.#delete(buf, view),
  };

  /**
   * Creates a decoder that names types with `resolveTypes`, drops changes in
   * schemas `skipSchema` matches, and sends a transaction's changes as a
   * partial frame whenever they reach `chunkBytes`, so no transaction is
   * ever held whole in memory.
   */
  constructor(
    resolveTypes: TypeNameResolver,
    skipSchema: SchemaFilter = () => false,
    chunkBytes = DEFAULT_CHUNK_BYTES,
  ) {
    this.#resolveTypes = resolveTypes;
    this.#skipSchema = skipSchema;
    this.#chunkBytes = chunkBytes;
  }

  /** True between a Begin and its Commit. */
  get inTransaction(): boolean {
    return this.#inTransaction;
  }

  /** Decodes one pgoutput message: a `Frame` at commit, a promise to await before the next message, or nothing. */
  decode(buf: Buffer): Frame | Promise<void> | void {
    const handler = this.#handlers[buf[0]];
    if (handler === undefined) return;
    return handler(buf, new DataView(buf.buffer, buf.byteOffset, buf.byteLength));
  }

  #commit(view: DataView): Frame | undefined {
    this.#inTransaction = false;
    const changes = this.#changes;
    this.#changes = [];
    this.#bytes = 0;
    // A transaction whose every change was filtered out (server bookkeeping) is not sent; the last
    // chunk of a chunked one always is, even empty: it carries the nextlsn to acknowledge.
    if (changes.length === 0 && !this.#chunked) return undefined;
    this.#lastEnd = readLsn(view, 10);
    this.#lastEndText = formatLsnAt(view, 10);
    const text = `{"nextlsn":"${this.#lastEndText}","change":[${changes.join(",")}]}`;
    return { text, nextLsn: this.#lastEnd, changes: changes.length, partial: false };
  }

  /** Adds one encoded change; returns a partial frame once the pending changes reach the chunk size. */
  #push(change: string): Frame | undefined {
    this.#changes.push(change);
    this.#bytes += change.length;
    if (this.#bytes < this.#chunkBytes) return undefined;
    const changes = this.#changes;
    this.#changes = [];
    this.#bytes = 0;
    this.#chunked = true;
    const text = `{"nextlsn":"${this.#lastEndText}","partial":true,"change":[${
      changes.join(",")
    }]}`;
    return { text, nextLsn: this.#lastEnd, changes: changes.length, partial: true };
  }

  async #relation(buf: Buffer, view: DataView): Promise<void> {
    let pos = 1;
    const relid = view.getUint32(pos);
    pos += 4;
    const [namespace, afterNs] = readCString(buf, pos);
    const [name, afterName] = readCString(buf, afterNs);
    pos = afterName + 1; // replica identity setting
    const ncols = view.getInt16(pos);
    pos += 2;
    const names: string[] = [];
    const types: ColumnType[] = [];
    const keyIndexes: number[] = [];
    for (let i = 0; i < ncols; i++) {
      const flags = buf[pos++];
      const [column, next] = readCString(buf, pos);
      pos = next;
      types.push({ oid: view.getUint32(pos), typmod: view.getInt32(pos + 4) });
      pos += 8;
      names.push(column);
      if (flags & 1) keyIndexes.push(i);
    }
    // pgoutput sends "" for pg_catalog.
    const schema = namespace === "" ? "pg_catalog" : namespace;
    const skip = this.#skipSchema(schema);
    const typeNames = skip ? types.map(() => "") : await this.#resolveTypes(types);
    const jsonNames = names.map((n) => JSON.stringify(n));
    const jsonTypes = typeNames.map((t) => JSON.stringify(t));
    const where = `,"schema":${JSON.stringify(schema)},"table":${JSON.stringify(name)}`;
    this.#relations.set(relid, {
      skip,
      names,
      jsonNames,
      jsonTypes,
      encoders: types.map((t) => encoderFor(t.oid)),
      keyIndexes,
      insertHead: `{"kind":"insert"${where}`,
      updateHead: `{"kind":"update"${where}`,
      deleteHead: `{"kind":"delete"${where}`,
      allColumns: `,"columnnames":[${jsonNames.join(",")}],"columntypes":[${
        jsonTypes.join(",")
      }],"columnvalues":[`,
      oldKeysHead: `,"oldkeys":{"keynames":[${
        keyIndexes.map((i) => jsonNames[i]).join(",")
      }],"keytypes":[${keyIndexes.map((i) => jsonTypes[i]).join(",")}],"keyvalues":[`,
    });
  }

  #relationOf(view: DataView): Relation | undefined {
    const relation = this.#relations.get(view.getUint32(1));
    if (relation === undefined) {
      throw new RangeError(
        `pgoutput sent a change for relation ${view.getUint32(1)} before describing it`,
      );
    }
    return relation.skip ? undefined : relation;
  }

  #insert(buf: Buffer, view: DataView): Frame | undefined {
    const relation = this.#relationOf(view);
    if (relation === undefined) return;
    const [values] = readTuple(buf, view, 6, relation.encoders);
    return this.#push(relation.insertHead + columns(relation, values) + "}");
  }

  #update(buf: Buffer, view: DataView): Frame | undefined {
    const relation = this.#relationOf(view);
    if (relation === undefined) return;
    let pos = 5;
    let old: TupleValues | undefined;
    if (buf[pos] === 0x4b /* K */ || buf[pos] === 0x4f /* O */) {
      [old, pos] = readTuple(buf, view, pos + 1, relation.encoders);
    }
    const [values] = readTuple(buf, view, pos + 1, relation.encoders);
    return this.#push(
      relation.updateHead + columns(relation, values) + oldKeys(relation, old ?? values) + "}",
    );
  }

  #delete(buf: Buffer, view: DataView): Frame | undefined {
    const relation = this.#relationOf(view);
    if (relation === undefined) return;
    const [old] = readTuple(buf, view, 6, relation.encoders);
    return this.#push(relation.deleteHead + oldKeys(relation, old) + "}");
  }
}

/** `,"columnnames":[…],"columntypes":[…],"columnvalues":[…]`, leaving out unchanged TOAST columns. */
function columns(relation: Relation, values: TupleValues): string {
  if (!values.includes(UNCHANGED)) return relation.allColumns + values.join(",") + "]";
  const present = values.flatMap((v, i) => (v === UNCHANGED ? [] : [i]));
  return `,"columnnames":[${present.map((i) => relation.jsonNames[i]).join(",")}],"columntypes":[${
    present.map((i) => relation.jsonTypes[i]).join(",")
  }],"columnvalues":[${present.map((i) => values[i]).join(",")}]`;
}

/** `,"oldkeys":{…}` with the replica identity columns of `values`. */
function oldKeys(relation: Relation, values: TupleValues): string {
  const keys = relation.keyIndexes;
  if (keys.some((i) => values[i] === UNCHANGED)) {
    const present = keys.filter((i) => values[i] !== UNCHANGED);
    return `,"oldkeys":{"keynames":[${
      present.map((i) => relation.jsonNames[i]).join(",")
    }],"keytypes":[${present.map((i) => relation.jsonTypes[i]).join(",")}],"keyvalues":[${
      present.map((i) => values[i]).join(",")
    }]}`;
  }
  let out = relation.oldKeysHead;
  for (let k = 0; k < keys.length; k++) out += (k === 0 ? "" : ",") + values[keys[k]];
  return out + "]}";
}

/** Reads TupleData at `pos`: each column JSON-encoded, `UNCHANGED` for unchanged TOAST. Returns the end offset too. */
function readTuple(
  buf: Buffer,
  view: DataView,
  pos: number,
  encoders: ValueEncoder[],
): [TupleValues, number] {
  const ncols = view.getInt16(pos);
  pos += 2;
  const values: TupleValues = new Array(ncols);
  for (let i = 0; i < ncols; i++) {
    const kind = buf[pos++];
    if (kind === 0x74 /* t: text */) {
      const len = view.getInt32(pos);
      pos += 4;
      values[i] = encoders[i](buf.toString("utf8", pos, pos + len));
      pos += len;
    } else if (kind === 0x6e /* n: null */) {
      values[i] = JSON_NULL;
    } else if (kind === 0x75 /* u: unchanged TOAST */) {
      values[i] = UNCHANGED;
    } else {
      throw new RangeError(
        `pgoutput tuple column ${i} has unsupported kind ${String.fromCharCode(kind)}`,
      );
    }
  }
  return [values, pos];
}

/** Reads a NUL-terminated UTF-8 string at `pos`; returns it and the offset after the NUL. */
function readCString(buf: Buffer, pos: number): [string, number] {
  const end = buf.indexOf(0, pos);
  return [buf.toString("utf8", pos, end), end + 1];
}
