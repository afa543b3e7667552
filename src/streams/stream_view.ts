/**
 * What a v2 stream lets its consumers see, resolved once from its stored
 * definition: its tables (by OID), of each its columns and the rows its
 * filter passes. Every read of the stream goes through it — the frames its
 * replication carries (and so the tail, a copy of them), its snapshot's
 * pages and export, their ordering and seeking — so nothing can show, or
 * sort by, what it hides.
 *
 * For frames, each relation pgoutput describes is matched to one of the
 * stream's tables (by OID, or through the partitioned table it is a
 * partition of), and its plan made from the relation's columns of the
 * moment, by name.
 * @module
 */

import type pg from "pg";
import {
  type RelationDescription,
  type RelationPlan,
  type StreamScope,
  StreamScopeError,
} from "../replication/pgoutput_decoder.ts";
import { type CompiledCondition, compileTest } from "../replication/row_filter.ts";
import type { ViewedTable } from "../snapshots/snapshot_reader.ts";
import type { StoredTable, StreamDefinition } from "./stream_definition.ts";

/** A stream's view of the database: see the module's documentation. */
export class StreamView {
  readonly #byOid: Map<number, StoredTable>;
  /** What the stream's replication carries: for the decoder. */
  readonly scope: StreamScope;

  /** The view of the stream `name` with `definition`; partitions are looked up through `pool`. */
  constructor(name: string, definition: StreamDefinition, pool: pg.Pool) {
    this.#byOid = new Map(definition.tables.map((t) => [t.oid, t]));
    this.scope = streamScope(name, definition, this.#byOid, pool);
  }

  /**
   * The stream's part of the table `oid` for reads (snapshot pages, export,
   * ordering and seeking): its columns (null: every one) and its filter;
   * undefined when the table is not the stream's (it reads as missing).
   */
  table(oid: number): ViewedTable | undefined {
    const table = this.#byOid.get(oid);
    return table === undefined ? undefined : { columns: table.columns, where: table.where };
  }
}

/** The decoder's scope of the stream `name`: its tables, found by OID or through a partition's root. */
function streamScope(
  name: string,
  definition: StreamDefinition,
  byOid: Map<number, StoredTable>,
  pool: pg.Pool,
): StreamScope {
  const ofRelation = new Map<number, StoredTable | undefined>();
  const tableOf = async (relid: number): Promise<StoredTable | undefined> => {
    if (byOid.has(relid)) return byOid.get(relid);
    if (ofRelation.has(relid)) return ofRelation.get(relid);
    // A partition of one of the stream's tables (at any depth) is part of it.
    const { rows } = await pool.query<{ oid: number }>(
      "SELECT relid::int AS oid FROM pg_partition_ancestors($1::oid)",
      [relid],
    );
    const table = rows.map((r: { oid: number }) => byOid.get(r.oid))
      .find((t: StoredTable | undefined) => t !== undefined);
    ofRelation.set(relid, table);
    return table;
  };
  const operations = new Set(definition.operations);
  return {
    operations: {
      insert: operations.has("insert"),
      update: operations.has("update"),
      delete: operations.has("delete"),
      truncate: operations.has("truncate"),
    },
    schemaEvents: true,
    async plan(relation: RelationDescription): Promise<RelationPlan | undefined> {
      const table = await tableOf(relation.relid);
      if (table === undefined) return undefined;
      const position = new Map(relation.columns.map((c, i) => [c.name, i]));
      const columns = table.columns === null
        ? relation.columns.map((_, i) => i)
        : table.columns.flatMap((c) => position.has(c) ? [position.get(c)!] : []);
      const filter: CompiledCondition[] = table.where.map((condition) => {
        const at = position.get(condition.column);
        const type = at === undefined ? undefined : relation.columns[at].type.oid;
        if (type !== condition.typeOid) {
          // Short: it is a close reason (at most 123 bytes).
          throw new StreamScopeError(
            `filter column ${JSON.stringify(condition.column)} of ${relation.table} was ${
              type === undefined ? "dropped or renamed" : "retyped"
            }; re-create stream ${name}`,
          );
        }
        return { column: condition.column, position: at!, test: compileTest(condition, condition) };
      });
      return { table: table.oid, columns, filter };
    },
  };
}
