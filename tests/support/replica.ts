/**
 * Test support: a consumer's copy of a stream's tables, built the way the
 * protocol says a consumer applies frames (read = upsert; insert, update,
 * delete, truncate; a `replace` backfill's `started` drops the table's
 * copy, and so does a table's `removed`), so a test can compare it with the table itself.
 * @module
 */

import type { BackfillChange, Change, RowChange, TransactionFrame } from "../../src/protocol.ts";

/** A row as the consumer holds it: column name → value, as the frames wrote them. */
export type ReplicaRow = Record<string, unknown>;

/** The key of a row change or read: its first column's value (the tests' tables key on `id`). */
function keyOf(names: string[], values: unknown[], key: string): string {
  return JSON.stringify(values[names.indexOf(key)]);
}

/** One consumer's copy of each table, by `schema.table`, keyed by the `key` column. */
export class Replica {
  readonly tables = new Map<string, Map<string, ReplicaRow>>();
  /** Every backfill marker applied, in order. */
  readonly backfills: BackfillChange[] = [];
  /** Every table a `removed` dropped, in order. */
  readonly removed: string[] = [];
  readonly #key: string;

  /** A copy keyed by the column `key`. */
  constructor(key = "id") {
    this.#key = key;
  }

  /** The copy of `table` (`schema.table`). */
  table(name: string): Map<string, ReplicaRow> {
    let table = this.tables.get(name);
    if (table === undefined) this.tables.set(name, table = new Map());
    return table;
  }

  /** Applies every change of `frame`, in order. */
  apply(frame: TransactionFrame<Change>): void {
    for (const change of frame.change) this.applyChange(change);
  }

  /** Applies one change. */
  applyChange(change: Change): void {
    if (change.kind === "schema") return;
    const table = this.table(`${change.schema}.${change.table}`);
    switch (change.kind) {
      case "backfill":
        if (change.state === "removed") {
          // The table left the stream: its copy is dropped.
          this.removed.push(`${change.schema}.${change.table}`);
          table.clear();
          return;
        }
        this.backfills.push(change);
        if (change.state === "started" && change.mode === "replace") table.clear();
        return;
      case "truncate":
        table.clear();
        return;
      case "read":
      case "insert":
        table.set(
          keyOf(change.columnnames!, change.columnvalues!, this.#key),
          rowOf(change.columnnames!, change.columnvalues!),
        );
        return;
      case "update":
      case "delete": {
        const row = change as RowChange;
        if (row.oldkeys !== undefined) {
          table.delete(keyOf(row.oldkeys.keynames, row.oldkeys.keyvalues, this.#key));
        }
        if (row.kind === "update") {
          table.set(
            keyOf(row.columnnames!, row.columnvalues!, this.#key),
            rowOf(row.columnnames!, row.columnvalues!),
          );
        }
      }
    }
  }
}

function rowOf(names: string[], values: unknown[]): ReplicaRow {
  return Object.fromEntries(names.map((n, i) => [n, values[i]]));
}
