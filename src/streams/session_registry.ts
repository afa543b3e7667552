/**
 * The open stream sessions, at most one per slot (PostgreSQL lets one
 * walsender read a slot). A new session claims its slot first, so that a
 * second request while the first is still starting gets the same 409; a
 * client reconnecting right after its socket dropped waits (up to the busy
 * timeout) for its old session to wind down instead.
 * @module
 */

import { ConflictError } from "../errors.ts";
import type { CloseCodeValue } from "../protocol.ts";
import type { ConsumerSession } from "./consumer_session.ts";

/** A slot claimed for a session being started: attach the session, or release the claim. */
export interface SessionClaim {
  /** The session now holds the slot, until it is done. */
  attach(session: ConsumerSession): void;
  /** The start failed: the slot is free again. */
  release(): void;
}

/** The open sessions, by slot name. */
export class SessionRegistry {
  readonly #sessions = new Map<string, ConsumerSession | "starting">();
  readonly #busyTimeoutMs: number;

  /** Waits at most `busyTimeoutSeconds` for an ending session to let its slot go. */
  constructor(busyTimeoutSeconds: number) {
    this.#busyTimeoutMs = busyTimeoutSeconds * 1000;
  }

  /** Claims `slotName` for a new session; a {@link ConflictError} (`what` is being streamed) if taken. */
  async claim(slotName: string, what: string): Promise<SessionClaim> {
    const previous = this.#sessions.get(slotName);
    if (previous !== undefined && previous !== "starting" && previous.ending) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const deadline = new Promise((resolve) => timer = setTimeout(resolve, this.#busyTimeoutMs));
      await Promise.race([previous.done, deadline]);
      clearTimeout(timer);
    }
    if (this.#sessions.has(slotName)) {
      throw new ConflictError(`Cannot stream: ${what} is already being streamed by another client`);
    }
    this.#sessions.set(slotName, "starting");
    let settled = false;
    return {
      attach: (session) => {
        settled = true;
        this.#sessions.set(slotName, session);
        void session.done.finally(() => {
          if (this.#sessions.get(slotName) === session) this.#sessions.delete(slotName);
        });
      },
      release: () => {
        if (!settled && this.#sessions.get(slotName) === "starting") {
          this.#sessions.delete(slotName);
        }
        settled = true;
      },
    };
  }

  /** Whether a session holds (or is starting on) `slotName`. */
  has(slotName: string): boolean {
    return this.#sessions.has(slotName);
  }

  /** Closes the session on `slotName`, if any, with `code` and `reason`; resolves once it is done. */
  async close(slotName: string, code: CloseCodeValue, reason: string): Promise<void> {
    const session = this.#sessions.get(slotName);
    if (session === undefined || session === "starting") return;
    session.close(code, reason);
    await session.done;
  }

  /** Closes every session. */
  async closeAll(code: CloseCodeValue, reason: string): Promise<void> {
    await Promise.all([...this.#sessions.keys()].map((slot) => this.close(slot, code, reason)));
  }
}
