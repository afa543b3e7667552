/**
 * A stream's standing against its WAL limits: how much of each it uses, and
 * the health that follows (`warning` from half of either limit, the WAL
 * guard's cue to log; `invalidated` once it acted).
 * @module
 */

import type { StreamHealth, StreamLimits } from "../protocol.ts";

/** Share of a limit from which a stream is in `warning`; the guard also logs at 80%. */
export const WARNING_RATIO = 0.5;

/** Shares of each limit a stream uses (0 where there is no limit). */
export interface Standing {
  lagRatio: number;
  idleRatio: number;
  health: StreamHealth;
}

/**
 * The standing of a stream with `limits` whose slot is `lagBytes` behind the
 * database (null: no slot) and whose consumer was last seen `idleSeconds` ago.
 */
export function standing(
  limits: StreamLimits,
  lagBytes: number | null,
  idleSeconds: number,
  invalidated: boolean,
): Standing {
  const lagRatio = limits.maxLagBytes > 0 && lagBytes !== null ? lagBytes / limits.maxLagBytes : 0;
  const idleRatio = limits.maxIdleSeconds > 0 ? idleSeconds / limits.maxIdleSeconds : 0;
  const health: StreamHealth = invalidated
    ? "invalidated"
    : Math.max(lagRatio, idleRatio) >= WARNING_RATIO
    ? "warning"
    : "ok";
  return { lagRatio, idleRatio, health };
}

/** Bytes for people: `8.0 GiB`. */
export function prettyBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) (value /= 1024), unit++;
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}
