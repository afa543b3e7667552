/**
 * The changes of a frame being built, kept as UTF-8 bytes rather than as
 * strings. Each change's string is encoded the moment it is added and dies
 * young; a frame's text is made once, when it is taken. Held as strings
 * until the frame was complete, a large transaction's changes survived
 * collection after collection and were moved to the old generation, which
 * grew by the chunk size every chunk until a full collection: the server's
 * memory followed its throughput instead of its chunk size.
 * @module
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Room kept before the changes for the frame's opening (`{"nextlsn":"…","partial":true,"change":[`). */
const HEAD_ROOM = 64;

/** Text gathered as a string before it is spilled into the bytes: small frames never are. */
const SPILL_UNITS = 16 << 10;

/**
 * The changes of one frame, comma-separated JSON: the latest as a string,
 * the earlier ones spilled into a reusable byte buffer.
 */
export class FrameBuilder {
  /** The largest buffer kept between frames; one grown past it (for a huge change) is let go. */
  readonly #keptBytes: number;
  #bytes = new Uint8Array(HEAD_ROOM + (64 << 10));
  /** End of the spilled bytes. */
  #end = HEAD_ROOM;
  /** Changes not spilled yet, comma-separated. */
  #text = "";
  #count = 0;
  /** UTF-8 length of the last frame taken, when it was known without counting (-1: not). */
  #takenBytes = -1;

  /** A builder for frames of about `chunkBytes` (one change may make a frame larger). */
  constructor(chunkBytes: number) {
    this.#keptBytes = 2 * chunkBytes + (64 << 10);
  }

  /** How many changes were added since the last {@link take}. */
  get count(): number {
    return this.#count;
  }

  /** About how many bytes the changes added since the last {@link take} take, commas included. */
  get size(): number {
    return this.#end - HEAD_ROOM + this.#text.length;
  }

  /** Appends one change's JSON text. */
  add(change: string): void {
    this.#text = this.#text === "" ? change : `${this.#text},${change}`;
    this.#count++;
    if (this.#text.length >= SPILL_UNITS) this.#spill();
  }

  /** Appends `count` changes given as UTF-8 JSON, comma-separated already. */
  addBytes(changes: Uint8Array, count: number): void {
    if (this.#text !== "") this.#spill();
    const comma = this.#end > HEAD_ROOM ? 1 : 0;
    const needed = this.#end + comma + changes.length;
    if (needed > this.#bytes.length) this.#grow(needed);
    if (comma) this.#bytes[this.#end++] = 0x2c; // ,
    this.#bytes.set(changes, this.#end);
    this.#end += changes.length;
    this.#count += count;
  }

  /**
   * The frame's text, `head` (an ASCII opening of at most {@link HEAD_ROOM}
   * bytes ending in `[`) + the changes + `]}`, as one string; the builder is
   * empty again.
   */
  take(head: string): string {
    if (this.#end === HEAD_ROOM) {
      const text = `${head}${this.#text}]}`;
      this.clear();
      this.#takenBytes = -1;
      return text;
    }
    this.#text += "]}";
    this.#spill();
    const start = HEAD_ROOM - head.length;
    for (let i = 0; i < head.length; i++) this.#bytes[start + i] = head.charCodeAt(i);
    const text = decoder.decode(this.#bytes.subarray(start, this.#end));
    this.#takenBytes = this.#end - start;
    this.clear();
    if (this.#bytes.length > this.#keptBytes) this.#bytes = new Uint8Array(HEAD_ROOM + (64 << 10));
    return text;
  }

  /** UTF-8 bytes of the frame the last {@link take} made, when known without counting; else -1. */
  get takenBytes(): number {
    return this.#takenBytes;
  }

  /** Drops the changes added since the last {@link take}. */
  clear(): void {
    this.#end = HEAD_ROOM;
    this.#text = "";
    this.#count = 0;
  }

  /** Moves the pending text into the bytes, after a comma if some are there already. */
  #spill(): void {
    const comma = this.#end > HEAD_ROOM && this.#text !== "]}" ? 1 : 0;
    // A UTF-16 unit encodes to at most 3 bytes.
    const needed = this.#end + comma + this.#text.length * 3;
    if (needed > this.#bytes.length) this.#grow(needed);
    if (comma) this.#bytes[this.#end++] = 0x2c; // ,
    this.#end += encoder.encodeInto(this.#text, this.#bytes.subarray(this.#end)).written;
    this.#text = "";
  }

  #grow(needed: number): void {
    const grown = new Uint8Array(Math.max(needed, this.#bytes.length * 2));
    grown.set(this.#bytes.subarray(0, this.#end));
    this.#bytes = grown;
  }
}
