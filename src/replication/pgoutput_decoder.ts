/**
 * Decodes pgoutput (protocol version 1) messages into transaction frames in
 * wal2json format-version 1, as JSON text built directly from PostgreSQL's
 * text output: no parse/stringify round trip, so numbers stay verbatim.
 *
 * What a stream carries is decided once per relation, when pgoutput
 * describes it: a {@link RelationPlan} names the columns written and the
 * row filter; the decoder reads only the values it needs (the columns
 * written, the key, the filter's), so a change the filter drops costs little
 * more than walking its tuple.
 *
 * Message layouts: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
 * @module
 */

import { Buffer } from "node:buffer";
import type { ColumnType } from "../postgres/type_names.ts";
import { FrameBuilder } from "./frame_builder.ts";
import type { Lsn } from "../lsn.ts";
import { formatLsnAt, readLsn } from "../lsn.ts";
import { type CompiledCondition, NOT_THERE, passes, type RawValue } from "./row_filter.ts";
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
  /** UTF-8 bytes of `text`, where the decoder knew them without counting (a large frame). */
  readonly bytes?: number;
  /** True for every chunk of a large transaction but the last. */
  readonly partial: boolean;
  /** The transaction's commit time (ms since the Unix epoch) as pgoutput's Begin carries it. */
  readonly commitTime: number;
  /**
   * The transaction's own position: the start of its commit record (Begin's
   * final LSN), the same whoever decodes it. With {@link firstChange} it names a
   * chunk across decoders, whatever their chunk size.
   */
  readonly txLsn: Lsn;
  /** Ordinal in its transaction of the frame's first row change (schema changes do not count). */
  readonly firstChange: number;
  /** Ordinal after its last row change: where the transaction's next frame starts. */
  readonly endChange: number;
}

/**
 * Where a decoder resumes a transaction that was partly delivered already
 * (relay mode: a new publisher after the log's last chunk): the first
 * `changes` row changes of the transaction at `txLsn` are dropped.
 */
export interface ResumePoint {
  txLsn: Lsn;
  changes: number;
}

/** Default size at which a transaction's changes are sent as a partial frame. */
export const DEFAULT_CHUNK_BYTES = 1 << 20;

export type { ColumnType };

/** Resolves type OIDs and modifiers to `format_type()` names, e.g. `character varying(20)`. */
export type TypeNameResolver = (types: ColumnType[]) => Promise<string[]>;

/** A relation as pgoutput's Relation message describes it. */
export interface RelationDescription {
  relid: number;
  schema: string;
  table: string;
  columns: { name: string; type: ColumnType; key: boolean }[];
}

/** How one relation's changes are written: which columns, and which rows. */
export interface RelationPlan {
  /** The OID of the stream's table the relation is (or is a partition of); default its own. */
  table?: number;
  /** Tuple positions of the columns written, in order. */
  columns: number[];
  /** Conditions on the tuple's values, by position; all must hold. None: every row. */
  filter?: CompiledCondition[];
}

/** The kinds of change a stream carries. */
export interface Operations {
  insert: boolean;
  update: boolean;
  delete: boolean;
  truncate: boolean;
}

/**
 * What a decoder's stream carries. `plan` is asked when pgoutput describes a
 * relation (at its first change in a session, and after each change of its
 * shape); it may look things up, and it may throw to stop the stream (a
 * filter that names a column the table no longer has).
 */
export interface StreamScope {
  /** How the relation's changes are written; undefined drops them. */
  plan(relation: RelationDescription): RelationPlan | undefined | Promise<RelationPlan | undefined>;
  operations: Operations;
  /**
   * Whether a `{"kind":"schema"}` change announces each relation's shape
   * before its first change in a session and after every change of it.
   */
  schemaEvents: boolean;
}

/** A change's values by tuple position (see `row_filter.ts`'s {@link RawValue}). */
export type { RawValue };

/** Changes a {@link LogTap} adds to a frame: one's JSON text, or several as comma-separated UTF-8 JSON. */
export type TappedChanges = string | { bytes: Uint8Array; count: number };

/**
 * What reads a stream's log beside its frames (a backfill: its watermarks,
 * and the keys changed between them). The decoder tells it, in log order,
 * of its logical decoding messages and of each change it sends of the one
 * table it watches; at the commit of a transaction that carried one of its
 * messages, it may give the frame to send for that transaction.
 */
export interface LogTap {
  /** Prefix of the logical decoding messages (`pg_logical_emit_message`) it reads. */
  readonly prefix: string;
  /** OID of the stream table whose changes it is told of now; 0: none. */
  readonly watching: number;
  /** A change sent of the watched table touched the row whose values (every column read) are `values`, named by `names`. */
  touched(names: readonly string[], values: RawValue[]): void;
  /** The watched table was truncated. */
  truncated(): void;
  /** The watched table was described (again: its shape may have changed): its column names and type OIDs. */
  described(names: readonly string[], types: readonly number[]): void;
  /**
   * A transactional message with the prefix, in the open transaction whose
   * commit record starts at `txLsn`; a promise holds decoding back until it
   * settles (nothing of the transaction is sent before).
   */
  message(content: string, txLsn: Lsn): void | Promise<void>;
  /**
   * A transaction (`xid`, committed; its commit record at `txLsn`) begins:
   * every one the slot sends, whatever it carries.
   */
  began(xid: number, txLsn: Lsn): void;
  /**
   * The transaction that carried its messages committed; `nextLsn` is its
   * end, the frame's nextlsn: the changes (JSON texts) to send in it, if any.
   */
  committed(nextLsn: string): readonly TappedChanges[] | undefined;
  /**
   * What the stream carries from here on, once, when it changed (a `PATCH`
   * of its definition took effect at this position): asked after
   * {@link began} and {@link committed}. Every relation is planned again
   * with it before the next transaction.
   */
  rescope?(): StreamScope | undefined;
}

/**
 * Thrown by a {@link StreamScope} that cannot carry a relation as defined
 * (its filter names a column the table no longer has): the stream stops,
 * and its consumer is told why, rather than sent rows the filter could not
 * judge.
 */
export class StreamScopeError extends Error {
  /** Creates the error; `message` says what no longer fits and what to do. */
  constructor(message: string) {
    super(message);
    this.name = "StreamScopeError";
  }
}

/** The v1 stream: every relation but those in the server's own schema, whole; no truncates. */
export function v1Scope(ownSchema: string): StreamScope {
  return {
    plan: (relation) =>
      relation.schema === ownSchema ? undefined : { columns: relation.columns.map((_, i) => i) },
    operations: { insert: true, update: true, delete: true, truncate: false },
    schemaEvents: false,
  };
}

interface Relation {
  /** How pgoutput described it: what it is planned from again when the stream's scope changes. */
  description: RelationDescription;
  /** Changes to this relation are dropped. */
  skip: boolean;
  /** The stream table it is (or is a partition of). */
  table: number;
  /** Column names by position. */
  names: string[];
  /** Every position read: for a relation a {@link LogTap} watches. */
  everyColumn: Uint8Array;
  ncols: number;
  encoders: ValueEncoder[];
  /** Which tuple positions the decoder reads: the columns written, the key, the filter's. */
  needed: Uint8Array;
  filter: CompiledCondition[] | undefined;
  /** The key's positions (replica identity; every column for REPLICA IDENTITY FULL). */
  keyIndexes: number[];
  /** Tuple positions of the columns written, in order. */
  columns: number[];
  /** Whether every column is written, in order: the fast path. */
  whole: boolean;
  /** JSON-encoded names and type names of every column, by position. */
  jsonNames: string[];
  jsonTypes: string[];
  /** `{"kind":"insert","schema":…,"table":…` (and update/delete variants). */
  insertHead: string;
  updateHead: string;
  deleteHead: string;
  /** `,"columnnames":[…],"columntypes":[…],"columnvalues":[` for the columns written. */
  allColumns: string;
  /** `,"oldkeys":{"keynames":[…],"keytypes":[…],"keyvalues":[` */
  oldKeysHead: string;
  /** The relation's `{"kind":"schema"}` change, or undefined when the stream has none. */
  schemaChange: string | undefined;
  /** Whether the schema change is still to be sent, ahead of the relation's next change. */
  announce: boolean;
  /** `{"kind":"truncate",…}`. */
  truncateChange: string;
}

const TAG_BEGIN = 0x42; // B
const TAG_COMMIT = 0x43; // C
const TAG_RELATION = 0x52; // R
const TAG_INSERT = 0x49; // I
const TAG_UPDATE = 0x55; // U
const TAG_DELETE = 0x44; // D
const TAG_TRUNCATE = 0x54; // T
const TAG_MESSAGE = 0x4d; // M

/** A transaction that committed this long ago is being replayed from a backlog. */
const BACKLOG_MS = 100;
/** A transaction with this many messages so far is a large one. */
const LARGE_TRANSACTION_MESSAGES = 64;

/** Microseconds from the Unix epoch to PostgreSQL's (2000-01-01). */
const POSTGRES_EPOCH_US = 946_684_800_000_000n;

/** Decoder state for one replication connection: relations seen and the open transaction. */
export class PgoutputDecoder {
  readonly #relations = new Map<number, Relation>();
  readonly #resolveTypes: TypeNameResolver;
  #scope: StreamScope;
  /** The scope changed at the last commit: every relation is planned again before the next Begin. */
  #replan = false;
  readonly #chunkBytes: number;
  /** The open transaction's changes not sent yet. */
  readonly #pending: FrameBuilder;
  #chunked = false;
  #inTransaction = false;
  #commitTime = 0;
  /** The open transaction's final LSN (its commit record's start). */
  #txLsn: Lsn = 0n;
  /** Row changes of the open transaction so far, and the ordinal of the pending frame's first. */
  #ordinal = 0;
  #frameStart = 0;
  /** Row changes still to drop at the start of the open transaction (a resumed one). */
  #skip = 0;
  readonly #resume: ResumePoint | undefined;
  /** Messages of the open transaction so far. */
  #messages = 0;
  /** nextlsn of the last complete transaction sent: what a partial frame carries. */
  #lastEnd: Lsn = 0n;
  #lastEndText = "0/0";
  /** Scratch arrays for tuple values, reused change after change. */
  #newValues: RawValue[] = [];
  #oldValues: RawValue[] = [];
  readonly #tap: LogTap | undefined;
  /** The open transaction carried a message of the tap's. */
  #tapped = false;

  /**
   * Message tag → handler, each given the message in place: `buf` and
   * `view` over the bytes it lies in, `at` the offset of its tag. A handler
   * returns a `Frame` when a transaction (or a chunk of it) is complete, a
   * promise when it must look something up first (a new relation). Tags not
   * listed are ignored: Origin and Type carry nothing wal2json
   * format-version 1 prints.
   */
  readonly #handlers: Record<
    number,
    (buf: Buffer, view: DataView, at: number) => Frame | Promise<void> | void
  > = {
    // Begin: final_lsn(8) commit timestamp(8) xid(4); a transaction's changes follow, up to its Commit.
    [TAG_BEGIN]: (_buf, view, at) => {
      this.#pending.clear();
      this.#inTransaction = true;
      this.#messages = 0;
      this.#txLsn = readLsn(view, at + 1);
      this.#commitTime = Number((view.getBigInt64(at + 9) + POSTGRES_EPOCH_US) / 1000n);
      this.#ordinal = 0;
      this.#frameStart = 0;
      // A transaction resumed part-way is a chunked one: its last frame is sent, even empty.
      const resumed = this.#resume !== undefined && this.#resume.txLsn === this.#txLsn;
      this.#chunked = resumed;
      this.#skip = resumed ? this.#resume!.changes : 0;
      this.#tap?.began(view.getUint32(at + 17), this.#txLsn);
      // The stream's definition changed at a transaction before this one (decoded in an earlier run).
      if (this.#rescoped()) return this.#replanAll();
    },
    // Commit: flags(1) commit_lsn(8) end_lsn(8) timestamp(8). end_lsn is wal2json's nextlsn.
    [TAG_COMMIT]: (_buf, view, at) => this.#commit(view, at),
    // Relation: describes a table before its first change in this session, and after DDL.
    [TAG_RELATION]: (buf, view, at) => this.#relation(buf, view, at),
    // Insert: relid(4) 'N' tuple.
    [TAG_INSERT]: (buf, view, at) => this.#insert(buf, view, at),
    // Update: relid(4) ['K'|'O' old tuple] 'N' new tuple.
    [TAG_UPDATE]: (buf, view, at) => this.#update(buf, view, at),
    // Delete: relid(4) 'K'|'O' old tuple.
    [TAG_DELETE]: (buf, view, at) => this.#delete(buf, view, at),
    // Truncate: nrelations(4) options(1) relid(4)…; each relation was described before.
    [TAG_TRUNCATE]: (_buf, view, at) => this.#truncate(view, at),
    // Message (messages 'true'): flags(1) lsn(8) prefix content_length(4) content; for the tap.
    [TAG_MESSAGE]: (buf, view, at) => this.#message(buf, view, at),
  };

  /** A Buffer over the bytes messages arrive in (for UTF-8 decoding), made again when they move. */
  #buf: Buffer = Buffer.alloc(0);

  /**
   * Creates a decoder that names types with `resolveTypes`, writes what
   * `scope` carries, and sends a transaction's changes as a partial frame
   * whenever they reach `chunkBytes`, so no transaction is ever held whole;
   * `resume` drops the changes of a transaction delivered part-way before;
   * `tap` reads the log's messages and the changes of the table it watches.
   */
  constructor(
    resolveTypes: TypeNameResolver,
    scope: StreamScope,
    chunkBytes = DEFAULT_CHUNK_BYTES,
    resume?: ResumePoint,
    tap?: LogTap,
  ) {
    this.#tap = tap;
    this.#resolveTypes = resolveTypes;
    this.#scope = scope;
    this.#chunkBytes = chunkBytes;
    this.#pending = new FrameBuilder(chunkBytes);
    this.#resume = resume;
  }

  /** True between a Begin and its Commit. */
  get inTransaction(): boolean {
    return this.#inTransaction;
  }

  /**
   * Whether nothing the consumer waits for can come before a while: inside a
   * transaction that committed long ago (a backlog being replayed), or deep
   * inside a large one. Then a reader may let messages pile up before reading.
   */
  get betweenFrames(): boolean {
    return this.#inTransaction &&
      (this.#messages >= LARGE_TRANSACTION_MESSAGES || Date.now() - this.#commitTime > BACKLOG_MS);
  }

  /**
   * Decodes one pgoutput message, `bytes[at, end)` (`view` over the same
   * bytes): a `Frame` when one is ready, a promise to await before the next
   * message, or nothing. Nothing of `bytes` is kept past the call, so they
   * may be the connection's own buffer.
   */
  decode(bytes: Uint8Array, view: DataView, at: number): Frame | Promise<void> | void {
    const handler = this.#handlers[bytes[at]];
    this.#messages++;
    if (handler === undefined) return;
    if (this.#buf.buffer !== bytes.buffer || this.#buf.byteOffset !== bytes.byteOffset) {
      this.#buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    }
    if (this.#replan && bytes[at] === TAG_BEGIN) {
      // Planned again before the first transaction under the new scope (a Begin returns no frame).
      const buf = this.#buf;
      return this.#replanAll().then(() => handler(buf, view, at) as Promise<void> | void);
    }
    return handler(this.#buf, view, at);
  }

  /** Takes a new scope from the tap, if it has one; true when it did. */
  #rescoped(): boolean {
    const scope = this.#tap?.rescope?.();
    if (scope === undefined) return false;
    this.#scope = scope;
    this.#replan = true;
    return true;
  }

  /** Plans every relation described so far again, with the current scope. */
  async #replanAll(): Promise<void> {
    this.#replan = false;
    for (const [relid, previous] of this.#relations) {
      this.#relations.set(relid, await this.#plan(previous.description, previous));
    }
  }

  #commit(view: DataView, at: number): Frame | undefined {
    this.#inTransaction = false;
    if (this.#tapped) {
      // A transaction of the tap's messages (a watermark): what the tap sends at its position.
      this.#tapped = false;
      const added = this.#tap!.committed(formatLsnAt(view, at + 10)) ?? [];
      for (const change of added) {
        if (typeof change === "string") this.#pending.add(change);
        else this.#pending.addBytes(change.bytes, change.count);
      }
      this.#rescoped();
    }
    const changes = this.#pending.count;
    // A transaction whose every change was filtered out is not sent; the last chunk of a chunked
    // one always is, even empty: it carries the nextlsn to acknowledge.
    if (changes === 0 && !this.#chunked) return undefined;
    this.#lastEnd = readLsn(view, at + 10);
    this.#lastEndText = formatLsnAt(view, at + 10);
    const text = this.#pending.take(`{"nextlsn":"${this.#lastEndText}","change":[`);
    return this.#frame(text, changes, false);
  }

  /** Message: a logical decoding message; a transactional one with the tap's prefix goes to it. */
  #message(buf: Buffer, view: DataView, at: number): void | Promise<void> {
    const tap = this.#tap;
    if (tap === undefined || (buf[at + 1] & 1) === 0 || !this.#inTransaction) return;
    const [prefix, after] = readCString(buf, at + 10);
    if (prefix !== tap.prefix) return;
    const length = view.getInt32(after);
    this.#tapped = true;
    return tap.message(buf.toString("utf8", after + 4, after + 4 + length), this.#txLsn);
  }

  /** Tells the tap of a change sent of the table it watches: the row of `values`. */
  #touch(relation: Relation, values: RawValue[]): void {
    this.#tap!.touched(relation.names, values);
  }

  /** The frame of `text` and `changes`, placed in its transaction; the next one starts after it. */
  #frame(text: string, changes: number, partial: boolean): Frame {
    const firstChange = this.#frameStart;
    this.#frameStart = this.#ordinal;
    const bytes = this.#pending.takenBytes;
    return {
      text,
      nextLsn: this.#lastEnd,
      changes,
      ...(bytes >= 0 ? { bytes } : {}),
      partial,
      commitTime: this.#commitTime,
      txLsn: this.#txLsn,
      firstChange,
      endChange: this.#ordinal,
    };
  }

  /**
   * Adds a row change of `relation`, after the relation's shape if it is
   * still to be announced; one a resumed transaction delivered before is
   * dropped (its relation's shape then comes with the first one sent).
   */
  #pushFor(relation: Relation, change: string): Frame | undefined {
    this.#ordinal++;
    if (this.#skip > 0) {
      this.#skip--;
      this.#frameStart = this.#ordinal;
      return undefined;
    }
    if (relation.announce) {
      relation.announce = false;
      this.#pending.add(relation.schemaChange!);
    }
    this.#pending.add(change);
    if (this.#pending.size < this.#chunkBytes) return undefined;
    this.#chunked = true;
    const changes = this.#pending.count;
    const text = this.#pending.take(`{"nextlsn":"${this.#lastEndText}","partial":true,"change":[`);
    return this.#frame(text, changes, true);
  }

  async #relation(buf: Buffer, view: DataView, at: number): Promise<void> {
    let pos = at + 1;
    const relid = view.getUint32(pos);
    pos += 4;
    const [namespace, afterNs] = readCString(buf, pos);
    const [name, afterName] = readCString(buf, afterNs);
    pos = afterName + 1; // replica identity setting
    const ncols = view.getInt16(pos);
    pos += 2;
    const description: RelationDescription = {
      relid,
      schema: namespace === "" ? "pg_catalog" : namespace, // pgoutput sends "" for pg_catalog
      table: name,
      columns: [],
    };
    for (let i = 0; i < ncols; i++) {
      const flags = buf[pos++];
      const [column, next] = readCString(buf, pos);
      pos = next;
      description.columns.push({
        name: column,
        type: { oid: view.getUint32(pos), typmod: view.getInt32(pos + 4) },
        key: (flags & 1) !== 0,
      });
      pos += 8;
    }
    this.#relations.set(relid, await this.#plan(description, this.#relations.get(relid)));
  }

  /** The relation of `description` as the scope plans it now; `previous`: as it was planned before. */
  async #plan(description: RelationDescription, previous?: Relation): Promise<Relation> {
    const plan = await this.#scope.plan(description);
    const relation = plan === undefined
      ? skipped(description)
      : await this.#describe(description, plan);
    if (this.#tap !== undefined && relation.table === this.#tap.watching) {
      this.#tap.described(relation.names, description.columns.map((c) => c.type.oid));
    }
    // The consumer learns a relation's shape before its first change with it: after the first
    // description in a session (it may have changed while nobody streamed), and whenever it changes
    // (or the stream's definition of it does); announced with the next change of it that is sent,
    // so a shape alone never makes a frame.
    relation.announce = relation.schemaChange !== undefined &&
      (relation.schemaChange !== previous?.schemaChange || previous.announce);
    return relation;
  }

  async #describe(description: RelationDescription, plan: RelationPlan): Promise<Relation> {
    const types = description.columns.map((c) => c.type);
    const typeNames = await this.#resolveTypes(types);
    const jsonNames = description.columns.map((c) => JSON.stringify(c.name));
    const jsonTypes = typeNames.map((t) => JSON.stringify(t));
    // The key as written: the replica identity's columns among those the stream carries, so that no
    // column it leaves out is ever sent (REPLICA IDENTITY FULL makes every column a key column).
    const written = new Set(plan.columns);
    const keyIndexes = description.columns.flatMap((c, i) => (c.key && written.has(i) ? [i] : []));
    const ncols = description.columns.length;
    const needed = new Uint8Array(ncols);
    for (const i of plan.columns) needed[i] = 1;
    for (const i of keyIndexes) needed[i] = 1;
    for (const c of plan.filter ?? []) needed[c.position] = 1;
    const where = `,"schema":${JSON.stringify(description.schema)},"table":${
      JSON.stringify(description.table)
    }`;
    const names = plan.columns.map((i) => jsonNames[i]).join(",");
    const typeList = plan.columns.map((i) => jsonTypes[i]).join(",");
    return {
      description,
      skip: false,
      table: plan.table ?? description.relid,
      names: description.columns.map((c) => c.name),
      everyColumn: new Uint8Array(ncols).fill(1),
      ncols,
      encoders: types.map((t) => encoderFor(t.oid)),
      needed,
      filter: plan.filter !== undefined && plan.filter.length > 0 ? plan.filter : undefined,
      keyIndexes,
      columns: plan.columns,
      whole: plan.columns.length === ncols && plan.columns.every((p, i) => p === i),
      jsonNames,
      jsonTypes,
      insertHead: `{"kind":"insert"${where}`,
      updateHead: `{"kind":"update"${where}`,
      deleteHead: `{"kind":"delete"${where}`,
      allColumns: `,"columnnames":[${names}],"columntypes":[${typeList}],"columnvalues":[`,
      oldKeysHead: `,"oldkeys":{"keynames":[${
        keyIndexes.map((i) => jsonNames[i]).join(",")
      }],"keytypes":[${keyIndexes.map((i) => jsonTypes[i]).join(",")}],"keyvalues":[`,
      announce: false,
      schemaChange: this.#scope.schemaEvents
        ? `{"kind":"schema"${where},"columnnames":[${names}],"columntypes":[${typeList}],"keynames":[${
          keyIndexes.map((i) => jsonNames[i]).join(",")
        }]}`
        : undefined,
      truncateChange: `{"kind":"truncate"${where}}`,
    };
  }

  #relationOf(view: DataView, at: number): Relation | undefined {
    const relation = this.#relations.get(view.getUint32(at + 1));
    if (relation === undefined) {
      throw new RangeError(
        `pgoutput sent a change for relation ${view.getUint32(at + 1)} before describing it`,
      );
    }
    return relation.skip ? undefined : relation;
  }

  #insert(buf: Buffer, view: DataView, at: number): Frame | undefined {
    const relation = this.#relationOf(view, at);
    if (relation === undefined || !this.#scope.operations.insert) return;
    const values = this.#newValues;
    const watched = relation.table === this.#tap?.watching;
    readTuple(buf, view, at + 6, relation, values, false, watched);
    if (relation.filter !== undefined && !passes(relation.filter, values)) return;
    if (watched) this.#touch(relation, values);
    return this.#pushFor(relation, relation.insertHead + columns(relation, values) + "}");
  }

  #update(buf: Buffer, view: DataView, at: number): Frame | undefined {
    const relation = this.#relationOf(view, at);
    if (relation === undefined) return;
    const operations = this.#scope.operations;
    let pos = at + 5;
    let old: RawValue[] | undefined;
    let oldIsWholeRow = false;
    const watched = relation.table === this.#tap?.watching;
    if (buf[pos] === 0x4b /* K */ || buf[pos] === 0x4f /* O */) {
      oldIsWholeRow = buf[pos] === 0x4f;
      old = this.#oldValues;
      pos = readTuple(buf, view, pos + 1, relation, old, !oldIsWholeRow, watched);
    }
    const values = this.#newValues;
    readTuple(buf, view, pos + 1, relation, values, false, watched);
    const filter = relation.filter;
    if (filter === undefined || passes(filter, values)) {
      if (!operations.update) return;
      if (watched) {
        this.#touch(relation, values);
        if (old !== undefined) this.#touch(relation, old);
      }
      return this.#pushFor(
        relation,
        relation.updateHead + columns(relation, values) + oldKeys(relation, old ?? values) + "}",
      );
    }
    // The new row is outside the stream's rows: it may have left them, so its key is deleted. Unless
    // the whole old row is known (REPLICA IDENTITY FULL) and was outside them too: then nothing.
    if (!operations.delete || (oldIsWholeRow && !passes(filter, old!))) return;
    if (watched) this.#touch(relation, old ?? values);
    return this.#pushFor(relation, relation.deleteHead + oldKeys(relation, old ?? values) + "}");
  }

  #delete(buf: Buffer, view: DataView, at: number): Frame | undefined {
    const relation = this.#relationOf(view, at);
    if (relation === undefined || !this.#scope.operations.delete) return;
    const wholeRow = buf[at + 5] === 0x4f; // O: REPLICA IDENTITY FULL; else K, the key alone
    const old = this.#oldValues;
    const watched = relation.table === this.#tap?.watching;
    readTuple(buf, view, at + 6, relation, old, !wholeRow, watched);
    // A key-only row lacks the filter's other columns: those conditions pass (the delete is sent).
    if (relation.filter !== undefined && !passes(relation.filter, old)) return;
    if (watched) this.#touch(relation, old);
    return this.#pushFor(relation, relation.deleteHead + oldKeys(relation, old) + "}");
  }

  #truncate(view: DataView, at: number): Frame | undefined {
    if (!this.#scope.operations.truncate) return;
    const count = view.getInt32(at + 1);
    let frame: Frame | undefined;
    for (let i = 0; i < count; i++) {
      const relation = this.#relations.get(view.getUint32(at + 6 + 4 * i));
      if (relation === undefined || relation.skip) continue;
      if (relation.table === this.#tap?.watching) this.#tap.truncated();
      frame = this.#pushFor(relation, relation.truncateChange) ?? frame;
    }
    return frame;
  }
}

/** A relation whose changes are dropped. */
function skipped(description: RelationDescription): Relation {
  return {
    description,
    skip: true,
    table: 0,
    names: [],
    everyColumn: new Uint8Array(0),
    ncols: description.columns.length,
    encoders: [],
    needed: new Uint8Array(0),
    filter: undefined,
    keyIndexes: [],
    columns: [],
    whole: false,
    jsonNames: [],
    jsonTypes: [],
    insertHead: "",
    updateHead: "",
    deleteHead: "",
    allColumns: "",
    oldKeysHead: "",
    schemaChange: undefined,
    announce: false,
    truncateChange: "",
  };
}

/** One value as JSON: its encoder applied to its text, `null` for SQL NULL. */
function encoded(relation: Relation, values: RawValue[], i: number): string {
  const value = values[i];
  return value === null ? JSON_NULL : relation.encoders[i](value as string);
}

/** `,"columnnames":[…],"columntypes":[…],"columnvalues":[…]`, leaving out unchanged TOAST columns. */
function columns(relation: Relation, values: RawValue[]): string {
  const positions = relation.columns;
  let complete = true;
  for (let k = 0; k < positions.length; k++) {
    if (values[positions[k]] === NOT_THERE) {
      complete = false;
      break;
    }
  }
  if (complete) {
    let out = relation.allColumns;
    for (let k = 0; k < positions.length; k++) {
      out += (k === 0 ? "" : ",") + encoded(relation, values, positions[k]);
    }
    return out + "]";
  }
  const present = positions.filter((i) => values[i] !== NOT_THERE);
  return `,"columnnames":[${present.map((i) => relation.jsonNames[i]).join(",")}],"columntypes":[${
    present.map((i) => relation.jsonTypes[i]).join(",")
  }],"columnvalues":[${present.map((i) => encoded(relation, values, i)).join(",")}]`;
}

/** `,"oldkeys":{…}` with the replica identity columns of `values`. */
function oldKeys(relation: Relation, values: RawValue[]): string {
  const keys = relation.keyIndexes;
  if (keys.some((i) => values[i] === NOT_THERE)) {
    const present = keys.filter((i) => values[i] !== NOT_THERE);
    return `,"oldkeys":{"keynames":[${
      present.map((i) => relation.jsonNames[i]).join(",")
    }],"keytypes":[${present.map((i) => relation.jsonTypes[i]).join(",")}],"keyvalues":[${
      present.map((i) => encoded(relation, values, i)).join(",")
    }]}`;
  }
  let out = relation.oldKeysHead;
  for (let k = 0; k < keys.length; k++) {
    out += (k === 0 ? "" : ",") + encoded(relation, values, keys[k]);
  }
  return out + "]}";
}

/**
 * Reads TupleData at `pos` into `values`: the text of each column the
 * relation needs (others are skipped, `NOT_THERE`), `null` for SQL NULL,
 * `NOT_THERE` for an unchanged TOASTed value. In a key-only tuple
 * (`keyOnly`), columns outside the key are not carried: `NOT_THERE` too.
 * `everyColumn` reads every column (for a {@link LogTap}).
 * Returns the offset after the tuple.
 */
function readTuple(
  buf: Buffer,
  view: DataView,
  pos: number,
  relation: Relation,
  values: RawValue[],
  keyOnly = false,
  everyColumn = false,
): number {
  const ncols = view.getInt16(pos);
  pos += 2;
  const needed = everyColumn ? relation.everyColumn : relation.needed;
  values.length = ncols;
  for (let i = 0; i < ncols; i++) {
    const kind = buf[pos++];
    if (kind === 0x74 /* t: text */) {
      const len = view.getInt32(pos);
      pos += 4;
      values[i] = needed[i] === 1 ? buf.toString("utf8", pos, pos + len) : NOT_THERE;
      pos += len;
    } else if (kind === 0x6e /* n: null */) {
      values[i] = keyOnly && !relation.keyIndexes.includes(i) ? NOT_THERE : null;
    } else if (kind === 0x75 /* u: unchanged TOAST */) {
      values[i] = NOT_THERE;
    } else {
      throw new RangeError(
        `pgoutput tuple column ${i} has unsupported kind ${String.fromCharCode(kind)}`,
      );
    }
  }
  return pos;
}

/** Reads a NUL-terminated UTF-8 string at `pos`; returns it and the offset after the NUL. */
function readCString(buf: Buffer, pos: number): [string, number] {
  const end = buf.indexOf(0, pos);
  return [buf.toString("utf8", pos, end), end + 1];
}
