/**
 * Type names as wal2json writes them: `format_type()` of a column's type OID
 * and modifier (`character varying(20)`, `numeric(10,2)`). Built-in types
 * (OID < 16384) never change and are cached; user-defined types are looked
 * up each time a relation is described, so a renamed type is seen.
 * @module
 */

import type pg from "pg";
/** One column's type as pgoutput's Relation message describes it. */
export interface ColumnType {
  oid: number;
  typmod: number;
}

/** The first OID of user-defined objects (`FirstNormalObjectId`). */
const FIRST_USER_OID = 16384;

/** Resolves column types to names, one query for all the missing ones. */
export class TypeNames {
  readonly #pool: pg.Pool;
  readonly #builtin = new Map<string, string>();

  /** Looks types up through `pool`. */
  constructor(pool: pg.Pool) {
    this.#pool = pool;
  }

  /** The `format_type()` name of each of `types`, in order. */
  async resolve(types: ColumnType[]): Promise<string[]> {
    const key = (t: ColumnType) => `${t.oid}:${t.typmod}`;
    const missing = types.filter((t) => t.oid >= FIRST_USER_OID || !this.#builtin.has(key(t)));
    if (missing.length === 0) return types.map((t) => this.#builtin.get(key(t))!);
    const { rows } = await this.#pool.query<{ name: string }>(
      `SELECT format_type(t.oid, nullif(t.typmod, -1)) AS name
         FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS t(oid, typmod, n) ORDER BY t.n`,
      [missing.map((t) => t.oid), missing.map((t) => t.typmod)],
    );
    const fresh = new Map(missing.map((t, i) => [key(t), rows[i].name]));
    for (const t of missing) {
      if (t.oid < FIRST_USER_OID) this.#builtin.set(key(t), fresh.get(key(t))!);
    }
    return types.map((t) => fresh.get(key(t)) ?? this.#builtin.get(key(t))!);
  }
}
