/**
 * One filter, three evaluators: PostgreSQL's publication row filter
 * (inserts, 15+), the decoder's row filter (updates, deletes, and every
 * change on 14) and SQL (snapshots). For every operator and type a filter
 * allows, a replica built from a stream's export plus its changes must equal
 * `SELECT … WHERE <the same condition>`, when the stream is created and after
 * random inserts, updates that move rows in and out (keys included) and
 * deletes. Run on every version of the matrix, so on 14 and 15+.
 * @module
 */

import assert from "node:assert/strict";
import { jsonParser } from "../client/exact_json.ts";
import type { Change, RowChange, TransactionFrame } from "../src/protocol.ts";
import {
  createStream,
  postJson,
  sql,
  startApi,
  startPostgres,
  StreamClient,
} from "./support/harness.ts";
import { seededRandom, testSeed } from "./support/random.ts";

/** The columns every table has, with their types: what the conditions test. */
const COLUMNS = {
  s: 'text COLLATE "C"',
  n: "numeric",
  b: "bigint",
  ts: "timestamptz",
  bo: "boolean",
  f: "double precision",
} as const;
type Column = keyof typeof COLUMNS;

/** Values each column takes, as SQL literal text (null: SQL NULL): the edge cases of each type. */
const VALUES: Record<Column, (string | null)[]> = {
  s: [
    "",
    "a",
    "A",
    "b",
    "ab",
    "a%b",
    "a_b",
    "axb",
    "a\\b",
    "it's",
    'quo"te',
    "2024-01-02",
    "2024x01",
    "é",
    "😀",
    "line\nbreak",
    "x'); drop table x; --",
    "-",
    null,
  ],
  n: [
    "0",
    "-0.000",
    "12.50",
    "12.5",
    "12.500000000000000000000000001",
    "123456789012345678901234567890.123456789",
    "123456789012345678901234567890.123456788",
    "NaN",
    "-1e-20",
    null,
  ],
  b: [
    "9007199254740993",
    "9007199254740992",
    "-9223372036854775808",
    "9223372036854775807",
    "0",
    "-1",
    null,
  ],
  ts: [
    "2024-01-01 00:00:00+00",
    "2024-01-01 05:30:00+05:30",
    "2023-12-31 19:00:00-05",
    "2024-01-01 00:00:00.000001+00",
    "1999-12-31 23:59:59.999999-12",
    "infinity",
    "-infinity",
    null,
  ],
  bo: ["true", "false", null],
  f: ["0.1", "-0", "1e300", "NaN", "Infinity", "3.0000000000000004", null],
};

/** The conditions tried: each on tables of its own (one of default, one of FULL replica identity). */
const CONDITIONS: unknown[][][] = [
  [["s", "=", "a"]],
  [["s", "<>", "a"]],
  [["s", "<", "b"]],
  [["s", ">=", "a%b"]],
  [["s", ">", "é"]],
  [["s", "in", ["a", "it's", "😀", ""]]],
  [["s", "like", "a%"]],
  [["s", "like", "%\\%%"]],
  [["s", "like", "a_b"]],
  [["s", "like", "a\\_b"]],
  [["s", "like", "2024-%"]],
  [["s", "like", "%'%"]],
  [["s", "like", "%\\\\%"]],
  [["s", "like", "_"]],
  [["s", "like", "%"]],
  [["s", "is null"]],
  [["s", "is not null"]],
  [["n", "=", "12.5"]],
  [["n", "<>", "12.5"]],
  [["n", "<", "123456789012345678901234567890.123456789"]],
  [["n", ">", "0"]],
  [["n", ">=", "NaN"]],
  [["n", "<=", "12.500000000000000000000000001"]],
  [["n", "in", ["0", "NaN", "12.50"]]],
  [["b", "=", "9007199254740993"]],
  [["b", ">", "9007199254740992"]],
  [["b", "<=", "-1"]],
  [["b", "<>", "0"]],
  [["b", "in", ["9223372036854775807", "-9223372036854775808"]]],
  [["ts", "=", "2024-01-01 03:00:00+03"]],
  [["ts", "<", "2024-01-01 00:00:00.000001+00"]],
  [["ts", ">=", "2023-12-31 19:00:00-05"]],
  [["ts", "<>", "infinity"]],
  [["ts", "in", ["-infinity", "2024-01-01 00:00:00+00"]]],
  [["bo", "=", true]],
  [["bo", "<>", true]],
  [["bo", "<", true]],
  [["bo", "is null"]],
  [["f", "=", "0.1"]],
  [["f", ">", "-0"]],
  [["f", "=", "NaN"]],
  [["f", "<", "Infinity"]],
  [["s", "like", "a%"], ["n", ">", "0"], ["bo", "=", true]],
  [["s", "in", ["a", "b"]], ["b", "is not null"], ["f", "<>", "0.1"]],
];

/** A row of the model: id and each column's literal text (or null). */
type Row = { id: number } & Record<Column, string | null>;

const columnNames = Object.keys(COLUMNS) as Column[];

/** `value` as a SQL literal. */
function literal(value: string | null): string {
  return value === null ? "NULL" : `'${value.replaceAll("'", "''")}'`;
}

/** What a replica holds of a row, whether from a frame or an export: id → each column's JSON value, exactly. */
type Replica = Map<string, unknown[]>;

/** The same for the database: each column as wal2json writes it, numbers kept as their text. */
async function expected(db: Parameters<typeof sql>[0], table: string, where: string) {
  const rows = await sql<{ id: string; v: unknown[] }>(
    db,
    `SELECT id::text AS id, json_build_array(s,
              CASE WHEN n IS NULL OR n::text IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE n::text END,
              b::text, CASE WHEN ts IS NOT NULL THEN format('%s', ts) END, bo,
              CASE WHEN f IS NULL OR f::text IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE f::text END) AS v
       FROM ${table} WHERE ${where}`,
  );
  return new Map(rows.map((r) => [r.id, r.v]));
}

/** `condition` as SQL, for the expectation (values quoted as literals here: test input is ours). */
function conditionSql(condition: unknown[][]): string {
  return condition.map(([column, op, value]) => {
    const type = COLUMNS[column as Column];
    const cast = (v: unknown) => `${literal(String(v))}::${type.replace(/ COLLATE.*/, "")}`;
    if (op === "is null" || op === "is not null") return `${column} ${String(op).toUpperCase()}`;
    if (op === "in") return `${column} = ANY (ARRAY[${(value as unknown[]).map(cast).join(", ")}])`;
    if (op === "like") return `${column} LIKE ${literal(String(value))}`;
    return `${column} ${op} ${cast(value)}`;
  }).join(" AND ");
}

const parse = jsonParser("string");

/** A row of a frame or an export as the replica keeps it: its values in column order. */
function replicaRow(names: string[], values: unknown[]): [string, unknown[]] {
  const at = new Map(names.map((n, i) => [n, values[i]]));
  return [String(at.get("id")), columnNames.map((c) => at.get(c))];
}

Deno.test("a filter means the same to PostgreSQL's row filter, the decoder and SQL: replica = SELECT … WHERE", async () => {
  await using postgres = await startPostgres();
  const db = postgres.database;
  const seed = testSeed();
  const random = seededRandom(seed);
  const pick = <T>(values: readonly T[]): T => values[Math.floor(random() * values.length)];
  const tables = CONDITIONS.flatMap((_, i) => [`t${i}`, `t${i}_full`]);
  const definition = columnNames.map((c) => `${c} ${COLUMNS[c]}`).join(", ");
  await sql(
    db,
    tables.map((t) =>
      `CREATE TABLE ${t}(id int primary key, ${definition});` +
      (t.endsWith("_full") ? `ALTER TABLE ${t} REPLICA IDENTITY FULL;` : "")
    ).join("\n") + "CREATE TABLE sentinel(id int primary key);",
  );
  // The model: what every table holds, so that each statement is valid on all of them.
  const model = new Map<number, Row>();
  const randomRow = (id: number): Row =>
    ({ id, ...Object.fromEntries(columnNames.map((c) => [c, pick(VALUES[c])])) }) as Row;
  const everywhere = (statement: (table: string) => string) =>
    tables.map((t) => statement(t)).join(";\n");
  const insert = (row: Row) =>
    everywhere((t) =>
      `INSERT INTO ${t} VALUES (${row.id}, ${columnNames.map((c) => literal(row[c])).join(", ")})`
    );
  const before: string[] = [];
  for (let id = 1; id <= 150; id++) {
    const row = randomRow(id);
    model.set(id, row);
    before.push(insert(row));
  }
  await sql(db, `BEGIN; ${before.join(";\n")}; COMMIT`);

  await using api = await startApi(db);
  await createStream(api.url, {
    name: "differential",
    tables: [
      ...CONDITIONS.flatMap((where, i) => [
        { table: `t${i}`, where },
        { table: `t${i}_full`, where },
      ]),
      "sentinel",
    ],
  });
  // On 15+ PostgreSQL itself filters the inserts: every table's filter is its publication's too.
  const [{ num }] = await sql<{ num: number }>(
    db,
    "SELECT current_setting('server_version_num')::int AS num",
  );
  if (num >= 150000) {
    const [{ filtered }] = await sql<{ filtered: number }>(
      db,
      `SELECT count(*)::int AS filtered FROM pg_publication_tables
        WHERE pubname LIKE 'pgds\_differential\_%\_i' AND rowfilter IS NOT NULL`,
    );
    assert.equal(filtered, tables.length, "tables filtered by the publication");
  }
  const wheres = new Map(
    CONDITIONS.flatMap((c, i) => [[`t${i}`, conditionSql(c)], [`t${i}_full`, conditionSql(c)]]),
  );
  const replicas = new Map<string, Replica>();
  const differences: string[] = [];
  const compare = async (when: string) => {
    for (const table of tables) {
      const want = await expected(db, table, wheres.get(table)!);
      const have = replicas.get(table)!;
      const ids = new Set([...want.keys(), ...have.keys()]);
      for (const id of ids) {
        const a = JSON.stringify(have.get(id));
        const b = JSON.stringify(want.get(id));
        if (a !== b) {
          differences.push(
            `${when}: ${table} WHERE ${wheres.get(table)}: row ${id}: replica ${a}, SELECT ${b}`,
          );
        }
      }
    }
  };

  // At creation: the export of each table is exactly what SQL selects.
  for (const table of tables) {
    const exported = await postJson(
      new URL("/v2/streams/differential/snapshot/export", api.url),
      { table },
    );
    assert.equal(exported.status, 200, exported.text);
    const replica: Replica = new Map();
    for (const line of exported.text.split("\n").filter(Boolean)) {
      const row = parse(line) as Record<string, unknown>;
      replica.set(...replicaRow(Object.keys(row), Object.values(row)));
    }
    replicas.set(table, replica);
  }
  await compare("at creation");

  // Then changes: rows moving in and out of every filter, keys changing, rows going.
  await using client = await StreamClient.changes(api.url, "differential");
  let nextId = 1000;
  for (let round = 0; round < 12; round++) {
    const statements: string[] = [];
    for (let k = 0; k < 25; k++) {
      const ids = [...model.keys()];
      const choice = random();
      if (choice < 0.25 || ids.length === 0) {
        const row = randomRow(nextId++);
        model.set(row.id, row);
        statements.push(insert(row));
      } else if (choice < 0.7) {
        const old = model.get(pick(ids))!;
        const changed = columnNames.filter(() => random() < 0.4);
        const updated: Row = { ...old };
        for (const c of changed) updated[c] = pick(VALUES[c]);
        const moves = random() < 0.15;
        if (moves) updated.id = nextId++;
        const sets = [
          ...(moves ? [`id = ${updated.id}`] : []),
          ...changed.map((c) => `${c} = ${literal(updated[c])}`),
        ];
        if (sets.length === 0) sets.push("s = s");
        model.delete(old.id);
        model.set(updated.id, updated);
        statements.push(
          everywhere((t) => `UPDATE ${t} SET ${sets.join(", ")} WHERE id = ${old.id}`),
        );
      } else {
        const id = pick(ids);
        model.delete(id);
        statements.push(everywhere((t) => `DELETE FROM ${t} WHERE id = ${id}`));
      }
    }
    await sql(db, `BEGIN; ${statements.join(";\n")}; COMMIT`);
  }
  await sql(db, "INSERT INTO sentinel VALUES (1)");
  // Apply every frame, as a consumer keeping a replica would, up to the sentinel.
  for (let done = false; !done;) {
    const frame = parse(await client.nextText()) as TransactionFrame<Change>;
    for (const change of frame.change) {
      if (change.kind === "schema" || change.kind === "truncate") continue;
      if (change.table === "sentinel") {
        done = true;
        continue;
      }
      const replica = replicas.get(change.table)!;
      const row = change as RowChange;
      if (row.oldkeys !== undefined) {
        const keys = row.oldkeys.keynames.indexOf("id");
        replica.delete(String(row.oldkeys.keyvalues[keys]));
      }
      if (row.kind !== "delete") replica.set(...replicaRow(row.columnnames!, row.columnvalues!));
    }
    client.ack(frame.nextlsn);
  }
  await compare("after the changes");
  const [{ version }] = await sql<{ version: string }>(
    db,
    "SELECT current_setting('server_version') AS version",
  );
  assert.deepEqual(
    differences.slice(0, 20),
    [],
    `PostgreSQL ${version}, TEST_SEED=${seed}: ${differences.length} differences`,
  );
  let rows = 0;
  for (const replica of replicas.values()) rows += replica.size;
  assert.ok(rows > tables.length * 10, `the filters passed ${rows} rows in all`);
});
