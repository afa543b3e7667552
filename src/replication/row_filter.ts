/**
 * A stream's row filter (`where`): conditions on columns, all of which must
 * hold, evaluated two ways that must agree: by PostgreSQL, as a `WHERE` of
 * quoted column names and bound values, for snapshots; and here, on the
 * text pgoutput writes for each value, for changes. So comparisons are
 * allowed only where the two agree exactly: by value for integers, decimals,
 * booleans, uuids, dates and timestamps; for strings, equality and LIKE
 * (code point by code point, as deterministic collations compare), and order
 * only under the "C" collation. Everything else may only be tested for NULL.
 * Values are checked (and written canonically) by PostgreSQL when a stream
 * is created.
 * @module
 */

/** The operators a condition can use. */
export const OPERATORS = [
  "=",
  "<>",
  "<",
  "<=",
  ">",
  ">=",
  "in",
  "like",
  "is null",
  "is not null",
] as const;

/** An operator of {@link OPERATORS}. */
export type Operator = typeof OPERATORS[number];

/** How values of a column compare, by its type. */
export type Comparison =
  | "integer"
  | "decimal"
  | "boolean"
  | "string"
  | "uuid"
  | "date"
  | "timestamp"
  | "timestamptz"
  | "none";

/** A condition as stored: column, operator, and its value(s) in PostgreSQL's canonical text. */
export interface Condition {
  column: string;
  op: Operator;
  /** For `in`, every value; for the null tests, none; otherwise one. */
  values: string[];
}

/** What {@link comparisonOf} needs to know of a column. */
export interface ColumnInfo {
  /** `atttypid`. */
  typeOid: number;
  /** Whether strings of it order as the "C" collation orders them (code points). */
  codePointOrder: boolean;
  /** `bpchar`: trailing spaces do not count. */
  padded: boolean;
  /** False for a nondeterministic collation, under which equal strings may differ in code points. */
  deterministic: boolean;
}

const INTEGER_TYPES = new Set([20, 21, 23, 26]); // int8, int2, int4, oid
const DECIMAL_TYPES = new Set([700, 701, 1700]); // float4, float8, numeric
const STRING_TYPES = new Set([25, 1043, 1042, 19]); // text, varchar, bpchar, name

/** How a column of `info`'s type compares. */
export function comparisonOf(info: ColumnInfo): Comparison {
  if (INTEGER_TYPES.has(info.typeOid)) return "integer";
  if (DECIMAL_TYPES.has(info.typeOid)) return "decimal";
  if (info.typeOid === 16) return "boolean";
  if (STRING_TYPES.has(info.typeOid)) return info.deterministic ? "string" : "none";
  if (info.typeOid === 2950) return "uuid";
  if (info.typeOid === 1082) return "date";
  if (info.typeOid === 1114) return "timestamp";
  if (info.typeOid === 1184) return "timestamptz";
  return "none";
}

/** The operators a column of `info` allows (the null tests always). */
export function operatorsFor(info: ColumnInfo): Operator[] {
  const nulls: Operator[] = ["is null", "is not null"];
  switch (comparisonOf(info)) {
    case "none":
      return nulls;
    case "string": {
      const equality: Operator[] = ["=", "<>", "in", ...(info.padded ? [] : ["like" as const])];
      return info.codePointOrder
        ? [...equality, "<", "<=", ">", ">=", ...nulls]
        : [...equality, ...nulls];
    }
    default:
      return ["=", "<>", "<", "<=", ">", ">=", "in", ...nulls];
  }
}

// ---- Values as orderable keys -------------------------------------------------------------------

/** A decimal as sign, digits without leading or trailing zeros, and the exponent of its first digit. */
interface Decimal {
  /** -2 -Infinity, -1 negative, 0 zero, 1 positive, 2 Infinity, 3 NaN (greatest, as PostgreSQL orders it). */
  kind: number;
  digits: string;
  exponent: number;
}

function decimal(text: string): Decimal {
  if (text === "NaN") return { kind: 3, digits: "", exponent: 0 };
  if (text === "Infinity") return { kind: 2, digits: "", exponent: 0 };
  if (text === "-Infinity") return { kind: -2, digits: "", exponent: 0 };
  const negative = text.startsWith("-");
  const match = /^[-+]?(\d*)(?:\.(\d*))?(?:[eE]([-+]?\d+))?$/.exec(text);
  if (match === null) throw new RangeError(`not a number: ${text}`);
  const whole = match[1] ?? "";
  const fraction = match[2] ?? "";
  const all = (whole + fraction).replace(/^0+/, "");
  if (all.replace(/0+$/, "") === "") return { kind: 0, digits: "", exponent: 0 };
  const leadingZeros = (whole + fraction).length - all.length;
  return {
    kind: negative ? -1 : 1,
    digits: all.replace(/0+$/, ""),
    exponent: whole.length - leadingZeros + Number(match[3] ?? 0),
  };
}

function compareDecimal(a: Decimal, b: Decimal): number {
  if (a.kind !== b.kind) return a.kind - b.kind;
  if (Math.abs(a.kind) !== 1) return 0;
  let magnitude = a.exponent - b.exponent;
  if (magnitude === 0) magnitude = a.digits < b.digits ? -1 : a.digits > b.digits ? 1 : 0;
  return a.kind * Math.sign(magnitude);
}

/** Compares strings by code point (as the "C" collation does on UTF-8), not by UTF-16 unit. */
function compareCodePoints(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i].codePointAt(0)! - y[i].codePointAt(0)!;
  }
  return x.length - y.length;
}

/** Days or microseconds from the epoch as a bigint, with ±infinity beyond any value. */
const INFINITY = 1n << 80n;

/** `YYYY-MM-DD[ BC]` (DateStyle ISO) → days, as an orderable bigint. */
function dateKey(text: string): bigint {
  if (text === "infinity") return INFINITY;
  if (text === "-infinity") return -INFINITY;
  const match = /^(\d{4,})-(\d{2})-(\d{2})( BC)?$/.exec(text);
  if (match === null) throw new RangeError(`not a date: ${text}`);
  const year = match[4] ? 1 - Number(match[1]) : Number(match[1]);
  return BigInt(daysFromCivil(year, Number(match[2]), Number(match[3])));
}

/** Howard Hinnant's days_from_civil: days since 1970-01-01 of a proleptic Gregorian date. */
function daysFromCivil(year: number, month: number, day: number): number {
  const y = month <= 2 ? year - 1 : year;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * (month + (month > 2 ? -3 : 9)) + 2) / 5) + day - 1;
  const doe = yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy;
  return era * 146097 + doe - 719468;
}

/** `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]` → microseconds (UTC when an offset is given). */
function timestampKey(text: string): bigint {
  if (text === "infinity") return INFINITY;
  if (text === "-infinity") return -INFINITY;
  const match =
    /^(\d{4,}-\d{2}-\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(?:([-+])(\d{2})(?::(\d{2}))?(?::(\d{2}))?)?( BC)?$/
      .exec(text);
  if (match === null) throw new RangeError(`not a timestamp: ${text}`);
  const days = dateKey(match[1] + (match[10] ?? ""));
  let micros = days * 86_400_000_000n +
    BigInt(Number(match[2]) * 3600 + Number(match[3]) * 60 + Number(match[4])) * 1_000_000n +
    BigInt((match[5] ?? "").padEnd(6, "0") || "0");
  if (match[6] !== undefined) {
    const offset = Number(match[7]) * 3600 + Number(match[8] ?? 0) * 60 + Number(match[9] ?? 0);
    micros -= BigInt((match[6] === "-" ? -1 : 1) * offset) * 1_000_000n;
  }
  return micros;
}

/** A total order on the text values of one comparison kind. */
function comparator(kind: Comparison, padded: boolean): (a: string, b: string) => number {
  switch (kind) {
    case "integer":
      return (a, b) => {
        const x = BigInt(a);
        const y = BigInt(b);
        return x < y ? -1 : x > y ? 1 : 0;
      };
    case "decimal":
      return (a, b) => compareDecimal(decimal(a), decimal(b));
    case "boolean":
      return (a, b) => (a === "t" ? 1 : 0) - (b === "t" ? 1 : 0);
    case "date":
      return (a, b) => {
        const x = dateKey(a);
        const y = dateKey(b);
        return x < y ? -1 : x > y ? 1 : 0;
      };
    case "timestamp":
    case "timestamptz":
      return (a, b) => {
        const x = timestampKey(a);
        const y = timestampKey(b);
        return x < y ? -1 : x > y ? 1 : 0;
      };
    case "uuid":
      return (a, b) => (a < b ? -1 : a > b ? 1 : 0);
    case "string":
      return padded
        ? (a, b) => compareCodePoints(a.replace(/ +$/, ""), b.replace(/ +$/, ""))
        : compareCodePoints;
    case "none":
      return () => {
        throw new TypeError("values of this type are not compared");
      };
  }
}

/** A LIKE pattern's element: one literal character (a code point), `_` or `%`. */
type LikeToken = string | typeof ANY_ONE | typeof ANY_RUN;
const ANY_ONE = 1;
const ANY_RUN = 2;

/** The length in UTF-16 units of the code point at `at` of `text`. */
function unitsAt(text: string, at: number): number {
  const unit = text.charCodeAt(at);
  return unit >= 0xd800 && unit <= 0xdbff && at + 1 < text.length ? 2 : 1;
}

/**
 * A LIKE pattern as a test, with PostgreSQL's rules for its default escape:
 * `%` any run of characters, `_` any one character, `\` makes the next
 * character literal, every other character is itself (nothing is special as
 * in a regular expression). Matched code point by code point, as LIKE
 * matches under a deterministic collation, by the greedy algorithm that
 * backtracks only to the last `%`: time at most the product of the lengths,
 * whatever the pattern. A pattern that ends in a lone `\` is refused, as
 * PostgreSQL refuses it.
 */
export function likeMatcher(pattern: string): (value: string) => boolean {
  const tokens: LikeToken[] = [];
  const chars = [...pattern];
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i];
    if (c === "\\") {
      if (i + 1 === chars.length) {
        throw new SyntaxError("LIKE pattern must not end with escape character");
      }
      tokens.push(chars[++i]);
    } else if (c === "%") {
      if (tokens.at(-1) !== ANY_RUN) tokens.push(ANY_RUN);
    } else tokens.push(c === "_" ? ANY_ONE : c);
  }
  return (value) => {
    let p = 0;
    let s = 0;
    let runP = -1;
    let runS = 0;
    while (s < value.length) {
      const token = tokens[p];
      if (token === ANY_ONE) {
        s += unitsAt(value, s);
        p++;
      } else if (token === ANY_RUN) {
        runP = p++;
        runS = s;
      } else if (token !== undefined && value.startsWith(token, s)) {
        s += token.length;
        p++;
      } else if (runP >= 0) {
        // Let the last % take one more character, and match what follows it from there.
        p = runP + 1;
        runS += unitsAt(value, runS);
        s = runS;
      } else {
        return false;
      }
    }
    while (tokens[p] === ANY_RUN) p++;
    return p === tokens.length;
  };
}

// ---- Predicates on pgoutput's values ------------------------------------------------------------

/** A value of a tuple as the decoder reads it: text, SQL NULL, or not there to test. */
export type RawValue = string | null | typeof NOT_THERE;

/** A value the change does not carry: an unchanged TOASTed value, a non-key column of a delete. */
export const NOT_THERE: unique symbol = Symbol("not there");

/** One compiled condition: its column's position in the tuple, and the test of its value. */
export interface CompiledCondition {
  column: string;
  position: number;
  test: (value: string | null) => boolean;
}

/** A compiled condition's test of one value (NULL never matches a comparison, as in SQL). */
export function compileTest(
  condition: Condition,
  info: ColumnInfo,
): (value: string | null) => boolean {
  const kind = comparisonOf(info);
  const compare = comparator(kind, info.padded);
  const [first] = condition.values;
  switch (condition.op) {
    case "is null":
      return (v) => v === null;
    case "is not null":
      return (v) => v !== null;
    case "=":
      return (v) => v !== null && compare(v, first) === 0;
    case "<>":
      return (v) => v !== null && compare(v, first) !== 0;
    case "<":
      return (v) => v !== null && compare(v, first) < 0;
    case "<=":
      return (v) => v !== null && compare(v, first) <= 0;
    case ">":
      return (v) => v !== null && compare(v, first) > 0;
    case ">=":
      return (v) => v !== null && compare(v, first) >= 0;
    case "in": {
      if (kind === "string" && !info.padded) {
        const set = new Set(condition.values);
        return (v) => v !== null && set.has(v);
      }
      return (v) => v !== null && condition.values.some((value) => compare(v, value) === 0);
    }
    case "like": {
      const matches = likeMatcher(first);
      return (v) => v !== null && matches(v);
    }
  }
}

/**
 * Whether a tuple passes every condition. A value the change does not carry
 * passes its condition: the decoder cannot tell, and sending is the side
 * that loses nothing (a consumer ignores a delete of a row it never had).
 */
export function passes(conditions: CompiledCondition[], values: RawValue[]): boolean {
  for (let i = 0; i < conditions.length; i++) {
    const condition = conditions[i];
    const value = values[condition.position];
    if (value !== NOT_THERE && !condition.test(value)) return false;
  }
  return true;
}

// ---- The same conditions as SQL -----------------------------------------------------------------

/**
 * `conditions` as the body of a SQL `WHERE`: column names quoted by
 * `quoted` (names from the catalog, quoted by PostgreSQL), each value as
 * `bind` writes it — a parameter, or a literal PostgreSQL quoted — cast to
 * the column's type `typeName` (from `format_type()` of the catalog), so
 * PostgreSQL compares as it would for the column.
 */
export function conditionsSql(
  conditions: Condition[],
  quoted: (column: string) => string,
  typeName: (column: string) => string,
  bind: (value: string) => string,
): string {
  const parts: string[] = [];
  for (const c of conditions) {
    const column = quoted(c.column);
    const type = typeName(c.column);
    switch (c.op) {
      case "is null":
      case "is not null":
        parts.push(`${column} ${c.op.toUpperCase()}`);
        break;
      case "in":
        parts.push(
          `${column} = ANY (ARRAY[${c.values.map((v) => `${bind(v)}::${type}`).join(", ")}])`,
        );
        break;
      case "like":
        parts.push(`${column} LIKE ${bind(c.values[0])}::text`);
        break;
      default:
        parts.push(`${column} ${c.op} ${bind(c.values[0])}::${type}`);
    }
  }
  return parts.length > 0 ? parts.join(" AND ") : "true";
}
