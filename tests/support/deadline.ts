/**
 * Deadlines for the waits in tests: a wait that never ends fails with what it
 * was waiting for instead of hanging the suite. Generous on purpose; they
 * guard against hangs and are not speed limits.
 * @module
 */

/** Default time a test waits for one event (a frame, a close, a process to listen). */
export const DEFAULT_WAIT_MS = 60_000;

/** Resolves or rejects as `promise` does, or rejects after `ms` with "Timed out after … waiting for `what`". */
export function deadline<T>(
  promise: PromiseLike<T>,
  what: string,
  ms = DEFAULT_WAIT_MS,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`Timed out after ${ms / 1000} s waiting for ${what}`)),
      ms,
    );
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

/**
 * Polls `check` every `intervalMs` until it returns a truthy value, and
 * returns it; for conditions that only show in a view or a file. Fails after
 * `ms` naming `what`.
 */
export async function poll<T>(
  check: () => Promise<T> | T,
  what: string,
  { ms = DEFAULT_WAIT_MS, intervalMs = 50 } = {},
): Promise<NonNullable<T>> {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > end) throw new Error(`Timed out after ${ms / 1000} s waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}
