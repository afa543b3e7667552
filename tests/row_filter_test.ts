import assert from "node:assert/strict";
import {
  type ColumnInfo,
  compileTest,
  type Condition,
  operatorsFor,
} from "../src/replication/row_filter.ts";
import { sql, startPostgres } from "./support/harness.ts";
import { seededRandom, testSeed } from "./support/random.ts";

/** Per type: values to test (as SQL literals' text, NULL as null), and the constants to compare with. */
const CASES: { type: string; oid: number; values: (string | null)[]; constants: string[] }[] = [
  {
    type: "bigint",
    oid: 20,
    values: ["0", "-1", "9007199254740993", "-9223372036854775808", "9223372036854775807", null],
    constants: ["0", "9007199254740992", "-9223372036854775808"],
  },
  { type: "smallint", oid: 21, values: ["-32768", "0", "7", null], constants: ["7", "-1"] },
  {
    type: "numeric",
    oid: 1700,
    values: [
      "12.50",
      "12.5",
      "-0.0001",
      "0",
      "1e3",
      "123456789012345678901234567890.5",
      "NaN",
      "Infinity",
      "-Infinity",
      null,
    ],
    constants: ["12.5", "1000", "NaN", "-Infinity", "0.00"],
  },
  {
    type: "double precision",
    oid: 701,
    values: ["1.5", "-0", "0", "1e300", "-1e-300", "NaN", "Infinity", "-Infinity", "0.1", null],
    constants: ["0", "1e300", "NaN", "0.1"],
  },
  { type: "real", oid: 700, values: ["1.5", "3.4e38", "NaN", null], constants: ["1.5", "NaN"] },
  { type: "boolean", oid: 16, values: ["true", "false", null], constants: ["true", "false"] },
  {
    type: "text",
    oid: 25,
    values: [
      "eu",
      "EU",
      "",
      "eu ",
      "é",
      "😀",
      "\uffff",
      "a%b",
      "a_b",
      "line\nbreak",
      "2024-01-02",
      "x'); drop table x; --",
      "(x)[y]{1}^$|+?.*/",
      "a-\\x",
      null,
    ],
    constants: ["eu", "", "😀", "\uffff", "é"],
  },
  {
    type: "character(3)",
    oid: 1042,
    values: ["ab", "ab ", "abc", "", null],
    constants: ["ab", "ab  "],
  },
  {
    type: "uuid",
    oid: 2950,
    values: ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000", null],
    constants: ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "ffffffff-ffff-ffff-ffff-ffffffffffff"],
  },
  {
    type: "date",
    oid: 1082,
    values: [
      "2020-01-02",
      "1999-12-31",
      "0044-03-15 BC",
      "infinity",
      "-infinity",
      "20000-01-01",
      null,
    ],
    constants: ["2020-01-02", "0001-01-01 BC", "infinity"],
  },
  {
    type: "timestamp",
    oid: 1114,
    values: [
      "2020-01-02 03:04:05",
      "2020-01-02 03:04:05.123456",
      "2020-01-02 03:04:05.5",
      "0044-03-15 12:00:00 BC",
      "infinity",
      null,
    ],
    constants: ["2020-01-02 03:04:05.5", "-infinity"],
  },
  {
    type: "timestamp with time zone",
    oid: 1184,
    values: [
      "2020-01-02 03:04:05+00",
      "2020-01-02 05:04:05+02",
      "2020-01-02 03:04:05.000001+00",
      "2020-01-01 23:34:05-03:30",
      "infinity",
      null,
    ],
    constants: ["2020-01-02 03:04:05+00", "2020-01-02 01:04:05-02"],
  },
];

const PATTERNS = [
  "eu",
  "e%",
  "%u",
  "_u",
  "%",
  "",
  "a\\%b",
  "a\\_b",
  "a%b",
  "😀",
  "_",
  "line%",
  "E%",
  // Characters special to regular expressions are plain to LIKE; "\\" escapes any character.
  "2024-%",
  "%'); drop table x; --",
  "(x)[y]{1}^$|+?.*/",
  "\\a\\-\\\\%",
  "%%_%%",
];

Deno.test("row filter predicates agree with PostgreSQL on every type and operator they allow", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  // Different session time zones make timestamptz text carry other offsets: compare across them.
  await sql(db, "ALTER DATABASE postgres SET TimeZone = 'America/St_Johns'");
  let checked = 0;
  for (const { type, oid, values, constants } of CASES) {
    const info: ColumnInfo = {
      typeOid: oid,
      codePointOrder: true,
      padded: oid === 1042,
      deterministic: true,
    };
    const ops = operatorsFor(info).filter((op) => op !== "like");
    // Each value and constant as its type's output function writes it: as pgoutput sends values, and
    // as stream creation stores constants.
    const text = async (literals: (string | null)[]) =>
      (await sql<{ t: string | null }>(
        db,
        `SELECT CASE WHEN v IS NOT NULL THEN format('%s', CAST(v AS ${type})) END AS t
           FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n`,
        [literals],
      )).map((r) => r.t);
    const valueTexts = await text(values);
    const constantTexts = (await text(constants)) as string[];
    for (const op of ops) {
      const operands = op === "in"
        ? [constantTexts]
        : op.startsWith("is")
        ? [[]]
        : constantTexts.map((c) => [c]);
      for (const operand of operands) {
        const condition: Condition = { column: "v", op, values: operand };
        const test = compileTest(condition, info);
        const rhs = op === "in"
          ? `= ANY ($2::${type}[])`
          : op.startsWith("is")
          ? op.toUpperCase()
          : `${op} $2::${type}`;
        const expected = await sql<{ r: boolean | null }>(
          db,
          `SELECT (CAST(v AS ${type}) ${rhs}) AS r FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n`,
          op.startsWith("is") ? [values] : [values, op === "in" ? operand : operand[0]],
        );
        valueTexts.forEach((value, i) => {
          assert.equal(
            test(value),
            expected[i].r === true, // NULL (unknown) does not pass a WHERE
            `${type}: ${JSON.stringify(value)} ${op} ${JSON.stringify(operand)}`,
          );
          checked++;
        });
      }
    }
  }
  // LIKE on text, with PostgreSQL's own escape rules.
  const texts = CASES.find((c) => c.type === "text")!.values;
  for (const pattern of PATTERNS) {
    const test = compileTest({ column: "v", op: "like", values: [pattern] }, {
      typeOid: 25,
      codePointOrder: false,
      padded: false,
      deterministic: true,
    });
    const expected = await sql<{ r: boolean | null }>(
      db,
      "SELECT (v LIKE $2) AS r FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n",
      [texts, pattern],
    );
    texts.forEach((value, i) => {
      assert.equal(
        test(value),
        expected[i].r === true,
        `${JSON.stringify(value)} LIKE ${JSON.stringify(pattern)}`,
      );
      checked++;
    });
  }
  console.log(`${checked} comparisons agree with PostgreSQL`);
  assert.ok(checked > 500);
});

Deno.test("operators a type does not compare exactly are not allowed", () => {
  const info = (typeOid: number, codePointOrder = false): ColumnInfo => ({
    typeOid,
    codePointOrder,
    padded: typeOid === 1042,
    deterministic: true,
  });
  assert.deepEqual(operatorsFor(info(3802)), ["is null", "is not null"]); // jsonb
  assert.deepEqual(operatorsFor(info(25)), ["=", "<>", "in", "like", "is null", "is not null"]);
  assert.ok(operatorsFor(info(25, true)).includes("<"), "text orders under the C collation");
  assert.ok(!operatorsFor(info(1042, true)).includes("like"), "no LIKE on char(n)");
  assert.deepEqual(
    operatorsFor({ typeOid: 25, codePointOrder: true, padded: false, deterministic: false }),
    ["is null", "is not null"],
  );
});

/** A text that LIKE `pattern` matches up to its end: escapes taken literally, `%` as nothing, `_` as "a". */
function likePrefixValue(pattern: string): string {
  const chars = [...pattern];
  let value = "";
  for (let i = 0; i < chars.length; i++) {
    if (chars[i] === "\\") {
      if (i + 1 < chars.length) value += chars[++i];
    } else if (chars[i] === "_") value += "a";
    else if (chars[i] !== "%") value += chars[i];
  }
  return value;
}

Deno.test("LIKE agrees with PostgreSQL on random patterns and values", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const seed = testSeed();
  const random = seededRandom(seed);
  const alphabet = ["a", "b", "%", "_", "\\", "-", ".", "😀", "é", "\n"];
  const word = (max: number) =>
    Array.from(
      { length: Math.floor(random() * max) },
      () => alphabet[Math.floor(random() * alphabet.length)],
    ).join("");
  const values = Array.from({ length: 60 }, () => word(8));
  let checked = 0;
  // First the patterns ending in a lone escape that PostgreSQL refuses only for some values (one
  // failed CI: three backslashes, refused here, accepted by PostgreSQL for '').
  const fixed = ["\\\\\\", "%\\\\\\", "_\\"];
  for (let i = 0; i < 150 + fixed.length; i++) {
    let pattern = fixed[i] ?? word(6);
    if (i >= fixed.length && pattern.endsWith("\\") && !pattern.endsWith("\\\\")) {
      pattern += "a";
    }
    let test: (value: string | null) => boolean;
    try {
      test = compileTest({ column: "v", op: "like", values: [pattern] }, {
        typeOid: 25,
        codePointOrder: false,
        padded: false,
        deterministic: true,
      });
    } catch (error) {
      // Refused here only where PostgreSQL refuses it too. PostgreSQL says so only when matching
      // reaches the pattern's end (on '' a pattern of three backslashes fails before it does), so
      // with values that match everything before it.
      const before = likePrefixValue(pattern);
      const refusals = await Promise.all(
        [before, `${before}a`, ""].map((value) =>
          sql(db, "SELECT $2::text LIKE $1", [pattern, value]).then(
            () => undefined,
            (refusal: Error) => refusal.message,
          )
        ),
      );
      assert.ok(
        refusals.some((message) => message !== undefined && /escape/.test(message)),
        `${JSON.stringify(pattern)}: refused here (${(error as Error).message}), not by PostgreSQL`,
      );
      continue;
    }
    const expected = await sql<{ r: boolean }>(
      db,
      "SELECT (v LIKE $2) AS r FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n",
      [values, pattern],
    );
    values.forEach((value, j) => {
      assert.equal(
        test(value),
        expected[j].r,
        `${JSON.stringify(value)} LIKE ${JSON.stringify(pattern)} (TEST_SEED=${seed})`,
      );
      checked++;
    });
  }
  assert.ok(checked > 5000, `${checked} comparisons`);
});
