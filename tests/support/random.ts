/**
 * A seeded random source for tests whose timing is random (fault injection),
 * so that a failing run can be replayed with the seed it printed.
 * @module
 */

/** A seed from `TEST_SEED` if set, else a fresh one. */
export function testSeed(): number {
  const fromEnv = Deno.env.get("TEST_SEED");
  return fromEnv ? Number(fromEnv) >>> 0 : crypto.getRandomValues(new Uint32Array(1))[0];
}

/** mulberry32: a small, fast PRNG; returns floats in [0, 1) determined by `seed`. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
