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
import type { StreamLimits } from "../protocol.ts";

/** A stream as stored. */
export interface StoredStream {
  name: string;
  slotName: string;
  definition: StreamDefinition;
  createdAt: Date;
  /** Its own limits; none: the server's defaults (a stream stored before limits existed). */
  limits: StreamLimits | null;
  /** When a consumer was last connected. */
  lastActivity: Date;
  /** When and why the WAL guard invalidated it, if it did. */
  invalidated: { at: Date; reason: string } | null;
  /** Relay mode: the sequence in its log where its current slot's frames begin. */
  relayStartSeq: number;
}

interface Row {
  name: string;
  slot_name: string;
  definition: StreamDefinition;
  created_at: Date;
  limits: StreamLimits | null;
  last_activity: Date;
  invalidated_at: Date | null;
  invalidation_reason: string | null;
  relay_start_seq: string;
}

function fromRow(row: Row): StoredStream {
  return {
    name: row.name,
    slotName: row.slot_name,
    definition: row.definition,
    createdAt: row.created_at,
    limits: row.limits,
    lastActivity: row.last_activity,
    invalidated: row.invalidated_at === null
      ? null
      : { at: row.invalidated_at, reason: row.invalidation_reason ?? "" },
    relayStartSeq: Number(row.relay_start_seq),
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
    limits: StreamLimits,
  ): Promise<StoredStream> {
    try {
      const { rows } = await this.#pool.query<Row>(
        `INSERT INTO ${this.#table}(name, slot_name, definition, limits) VALUES ($1, $2, $3, $4)
         RETURNING *`,
        [name, slotName, JSON.stringify(definition), JSON.stringify(limits)],
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

  /** Gives the stream `name` a new slot: not invalidated any more, its idle clock restarted. */
  async replaceSlot(name: string, slotName: string): Promise<StoredStream> {
    const { rows } = await this.#pool.query<Row>(
      `UPDATE ${this.#table} SET slot_name = $2, last_activity = now(), invalidated_at = NULL,
              invalidation_reason = NULL, slot_ready = false
        WHERE name = $1 RETURNING *`,
      [name, slotName],
    );
    return fromRow(rows[0]);
  }

  /** Sets the limits of the stream `name`; undefined if there is none. */
  async setLimits(name: string, limits: StreamLimits): Promise<StoredStream | undefined> {
    const { rows } = await this.#pool.query<Row>(
      `UPDATE ${this.#table} SET limits = $2 WHERE name = $1 RETURNING *`,
      [name, JSON.stringify(limits)],
    );
    return rows[0] && fromRow(rows[0]);
  }

  /** Relay mode: the current slot's frames begin at `seq` of the stream's log. */
  async setRelayStart(name: string, seq: number): Promise<void> {
    await this.#pool.query(`UPDATE ${this.#table} SET relay_start_seq = $2 WHERE name = $1`, [
      name,
      seq,
    ]);
  }

  /** Records that the stream `name` was invalidated for `reason` (once: the first reason stays). */
  async invalidate(name: string, reason: string): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table} SET invalidated_at = now(), invalidation_reason = $2
        WHERE name = $1 AND invalidated_at IS NULL`,
      [name, reason],
    );
  }

  /** Forgets the stream `name`. */
  async delete(name: string): Promise<void> {
    await this.#pool.query(`DELETE FROM ${this.#table} WHERE name = $1`, [name]);
  }
}
