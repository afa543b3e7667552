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
  /** The last change of its definition (`PATCH`), until its consumer is known to be past it. */
  switch: StoredSwitch | null;
}

/**
 * A change of a stream's definition: made in one transaction, which wrote
 * a watermark with `nonce` to the log; the decoders reading the log switch
 * from `previous` to the stream's definition there.
 */
export interface StoredSwitch {
  nonce: string;
  previous: StreamDefinition;
  /** The start of its transaction's commit record, once a decoder saw it ("X/Y"); null before. */
  lsn: string | null;
  /** What its frame carries (JSON texts). */
  changes: string[];
  /** Backfills it started (their `started` is in its frame) and ended. */
  started: string[];
  ended: string[];
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
  switch: StoredSwitch | null;
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
    switch: row.switch,
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
              invalidation_reason = NULL, slot_ready = false, switch = NULL
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

  /**
   * Locks the stream `name` for a change of its definition, on `client` in
   * its transaction; undefined if there is none.
   */
  async lockForChange(client: pg.PoolClient, name: string): Promise<StoredStream | undefined> {
    const { rows } = await client.query<Row>(
      `SELECT * FROM ${this.#table} WHERE name = $1 FOR UPDATE`,
      [name],
    );
    return rows[0] && fromRow(rows[0]);
  }

  /** Records, on `client` in the change's transaction, the stream's new definition and the change. */
  async change(
    client: pg.PoolClient,
    name: string,
    definition: StreamDefinition,
    change: StoredSwitch | null,
  ): Promise<void> {
    await client.query(
      `UPDATE ${this.#table} SET definition = $2, switch = $3 WHERE name = $1`,
      [name, JSON.stringify(definition), change === null ? null : JSON.stringify(change)],
    );
  }

  /**
   * The change `nonce` of the stream's definition, if it is its current one,
   * with where a decoder saw it in the log (kept once recorded).
   */
  async markSwitch(name: string, nonce: string, lsn: string): Promise<StoredStream | undefined> {
    const { rows: found } = await this.#pool.query<Row>(
      `UPDATE ${this.#table}
          SET switch = jsonb_set(switch, '{lsn}',
                CASE WHEN switch ->> 'lsn' IS NULL THEN to_jsonb($3::text) ELSE switch -> 'lsn' END)
        WHERE name = $1 AND switch ->> 'nonce' = $2 RETURNING *`,
      [name, nonce, lsn],
    );
    return found[0] && fromRow(found[0]);
  }

  /** The stream's consumer is past the change `nonce`: it is forgotten. */
  async endSwitch(name: string, nonce: string): Promise<void> {
    await this.#pool.query(
      `UPDATE ${this.#table} SET switch = NULL WHERE name = $1 AND switch ->> 'nonce' = $2`,
      [name, nonce],
    );
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
