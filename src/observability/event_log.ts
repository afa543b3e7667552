/**
 * The recent events of the process: every log line at `info` and above,
 * kept (whatever `LOG_LEVEL` writes) in a bounded ring so that an operator
 * sees what happened — replication lost and resumed, WAL-guard warnings
 * and invalidations, auth refusals, consumers connecting and leaving —
 * without a log pipeline. `GET /v2/events` serves them to admins.
 * @module
 */

import type { ServerEvent } from "../protocol.ts";

/** Events kept by default: about a day of a busy server's connects and refusals. */
export const DEFAULT_EVENT_CAPACITY = 2000;

/** A bounded ring of {@link ServerEvent}s, oldest dropped first. */
export class EventLog {
  readonly #capacity: number;
  readonly #events: ServerEvent[] = [];
  #start = 0;
  #nextId = 1;

  /** A ring of at most `capacity` events. */
  constructor(capacity: number = DEFAULT_EVENT_CAPACITY) {
    if (!(capacity >= 1)) throw new RangeError(`Cannot keep events: capacity ${capacity} < 1`);
    this.#capacity = capacity;
  }

  /** Records an event; the oldest goes once the ring is full. */
  add(event: Omit<ServerEvent, "id">): void {
    const entry = { id: this.#nextId++, ...event };
    if (this.#events.length < this.#capacity) {
      this.#events.push(entry);
    } else {
      this.#events[this.#start] = entry;
      this.#start = (this.#start + 1) % this.#capacity;
    }
  }

  /** Events with an id above `after`, oldest first, at most the newest `limit` of them. */
  list(after = 0, limit: number = this.#capacity): ServerEvent[] {
    const ordered = this.#events.slice(this.#start).concat(this.#events.slice(0, this.#start));
    const newer = ordered.filter((event) => event.id > after);
    return newer.slice(Math.max(0, newer.length - limit));
  }
}
