/**
 * A timer for a moment that may be further away than `setTimeout` can wait
 * (2^31 - 1 ms, about 24.8 days): it waits in steps.
 * @module
 */

/** The longest delay `setTimeout` honours. */
const MAX_DELAY_MS = 2 ** 31 - 1;

/** Calls `run` at `at` (ms since the epoch), or at once if that has passed; returns the cancel. */
export function atTime(at: number, run: () => void): () => void {
  let timer: ReturnType<typeof setTimeout>;
  const arm = () => {
    const delay = at - Date.now();
    timer = delay > MAX_DELAY_MS
      ? setTimeout(arm, MAX_DELAY_MS)
      : setTimeout(run, Math.max(0, delay));
  };
  arm();
  return () => clearTimeout(timer);
}
