/**
 * JSON numbers that JavaScript numbers would change, kept as text.
 * @module
 */

/**
 * A JSON number whose digits a JavaScript number cannot hold (an integer
 * beyond 2^53, a decimal it would round), kept as its source text: a filter
 * value compares exactly, and a field that wants a number rejects it.
 */
export class JsonNumber {
  /** The number as the body wrote it. */
  readonly source: string;

  /** Wraps the source text of a number. */
  constructor(source: string) {
    this.source = source;
  }
}
