/**
 * JSON parsing that keeps numbers exact on request. wal2json (and this
 * server) write `bigint` and `numeric` values as JSON numbers, verbatim;
 * `JSON.parse` rounds any beyond 2^53 or with more digits than a double
 * holds. With `"string"` every number comes back as its exact text; with
 * `"bigint"` integers come back as `bigint` and other numbers as text.
 * @module
 */

/** How JSON numbers are returned: `number` (rounded as `JSON.parse` does), exact text, or `bigint`. */
export type NumberMode = "number" | "string" | "bigint";

/** A JSON parser. */
export type JsonParser = (text: string) => unknown;

/** Whether `JSON.parse` hands revivers the source text of each value (ES2025; not Node 20). */
const HAS_SOURCE = (() => {
  try {
    let source: unknown;
    // deno-lint-ignore no-explicit-any
    JSON.parse("1", (_key, value, context?: any) => (source = context?.source, value));
    return source === "1";
  } catch {
    return false;
  }
})();

/** Marks a number token quoted by the fallback scanner; PostgreSQL text never holds U+0000. */
const MARK = "\u0000#";

function convert(token: string, mode: NumberMode): unknown {
  if (mode === "bigint" && /^-?\d+$/.test(token)) return BigInt(token);
  return token;
}

/** Quotes every number token outside strings as `"\u0000#<token>"`, for engines without `source`. */
function quoteNumbers(text: string): string {
  let out = "";
  let from = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) { // a string: skip to its closing quote
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 0x5c) i++;
        else if (d === 0x22) break;
      }
    } else if (c === 0x2d || (c >= 0x30 && c <= 0x39)) {
      let end = i + 1;
      while (end < text.length && /[0-9eE.+-]/.test(text[end])) end++;
      out += `${text.slice(from, i)}"\\u0000#${text.slice(i, end)}"`;
      from = end;
      i = end - 1;
    }
  }
  return out + text.slice(from);
}

/** A parser returning numbers as `mode` says. */
export function jsonParser(mode: NumberMode = "number"): JsonParser {
  if (mode === "number") return JSON.parse;
  if (HAS_SOURCE) {
    return (text) =>
      // deno-lint-ignore no-explicit-any
      JSON.parse(text, (_key, value, context?: any) =>
        typeof value === "number" ? convert(context.source, mode) : value);
  }
  return fallbackParser(mode);
}

/** Exposed for tests: the fallback parser, whatever the engine supports. */
export function fallbackParser(mode: Exclude<NumberMode, "number">): JsonParser {
  return (text) =>
    JSON.parse(
      quoteNumbers(text),
      (_key, value) =>
        typeof value === "string" && value.startsWith(MARK)
          ? convert(value.slice(MARK.length), mode)
          : value,
    );
}
