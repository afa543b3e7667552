/**
 * Where v2 streams are kept: `pgdeltastream.streams`, one row a stream
 * (name, slot, definition), in the database whose changes they carry, so
 * that every server instance sees the same streams.
 * @module
 */

import type pg from "pg";
import { ConflictError } from "../errors.ts";
import { SqlState, sqlState } from "../postgres/database.ts";
import type { StreamDefinition } from "./stream_definition.ts";

/** A stream as stored. */
export interface StoredStream {
  name: string;
  slotName: string;
  definition: StreamDefinition;
  createdAt: Date;
}

interface Row {
  name: string;
  slot_name: string;
  definition: StreamDefinition;
  created_at: Date;
}

function fromRow(row: Row): StoredStream {
  return {
    name: row.name,
    slotName: row.slot_name,
    definition: row.definition,
    createdAt: row.created_at,
  };
}

/** The streams table of the server's schema. */
export class StreamStore {
  readonly #pool: pg.Pool;
  readonly #table: string;

  /** Keeps streams in `${schema}.streams` through `pool`. */
  constructor(pool: pg.Pool, schema: string) {
    this.#pool = pool;
    this.#table = `${schema}.streams`;
  }

  /** Records a new stream; a {@link ConflictError} if its name is taken. */
  async insert(
    name: string,
    slotName: string,
    definition: StreamDefinition,
  ): Promise<StoredStream> {
    try {
      const { rows } = await this.#pool.query<Row>(
        `INSERT INTO ${this.#table}(name, slot_name, definition) VALUES ($1, $2, $3) RETURNING *`,
        [name, slotName, JSON.stringify(definition)],
      );
      return fromRow(rows[0]);
    } catch (error) {
      if (sqlState(error) === SqlState.UniqueViolation) {
        throw new ConflictError(`Cannot create stream: a stream named "${name}" already exists`);
      }
      throw error;
    }
  }

  /** Every stream, by name. */
  async list(): Promise<StoredStream[]> {
    const { rows } = await this.#pool.query<Row>(`SELECT * FROM ${this.#table} ORDER BY name`);
    return rows.map(fromRow);
  }

  /** The stream `name`, or undefined. */
  async get(name: string): Promise<StoredStream | undefined> {
    const { rows } = await this.#pool.query<Row>(`SELECT * FROM ${this.#table} WHERE name = $1`, [
      name,
    ]);
    return rows[0] && fromRow(rows[0]);
  }

  /** Forgets the stream `name`. */
  async delete(name: string): Promise<void> {
    await this.#pool.query(`DELETE FROM ${this.#table} WHERE name = $1`, [name]);
  }
}
