/**
 * What a v2 stream's replication carries, from its stored definition: each
 * relation pgoutput describes is matched to one of the stream's tables (by
 * OID, or through the partitioned table it is a partition of), and its plan
 * made from the relation's columns of the moment, by name.
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
import type { StoredTable, StreamDefinition } from "./stream_definition.ts";

/** The scope of the stream `name` with `definition`; partitions are looked up through `pool`. */
export function streamScope(
  name: string,
  definition: StreamDefinition,
  pool: pg.Pool,
): StreamScope {
  const byOid = new Map(definition.tables.map((t) => [t.oid, t]));
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
      return { columns, filter };
    },
  };
}
