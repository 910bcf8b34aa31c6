// Reconnect delays: full-jitter exponential backoff with a server-given floor. Pure.

export interface BackoffOptions {
  /** The smallest delay, and the base of the exponential window (ms). */
  minDelayMs: number;
  /** The largest window (ms): no backoff delay is longer, except a server-given floor. */
  maxDelayMs: number;
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry after a loss).
 *
 * The window doubles per attempt, `[min, min(max, min * 2^(attempt+1))]`, and the delay is
 * drawn uniformly across the whole window ("full jitter"): clients cut off together spread
 * over the window instead of returning in lockstep. Every delay is at least `minDelayMs`, so no
 * failure loops hot. `floorMs` (a server-given delay: `reconnect_after_ms`, `Retry-After`) is a
 * floor: the result is never below it, even past `maxDelayMs`.
 *
 * `random` returns a number in [0, 1).
 */
export function backoffDelay(attempt: number, opts: BackoffOptions, random: () => number, floorMs = 0): number {
  const min = Math.max(0, opts.minDelayMs);
  const max = Math.max(min, opts.maxDelayMs);
  // 2^31 is far past any max: cap the exponent so the window stays finite.
  const exp = Math.min(Math.max(0, Math.floor(attempt)) + 1, 31);
  const top = Math.min(max, min * 2 ** exp);
  const r = clamp01(random());
  const delay = min + r * (top - min);
  return Math.max(Math.round(delay), Math.ceil(Math.max(0, floorMs)));
}

/**
 * The delay before following a `goaway`: the server's `reconnect_after_ms` (already spread by
 * the edge over its drain) plus up to `jitterMs` of our own, so clients that got the same value
 * do not arrive in the same millisecond.
 */
export function goawayDelay(reconnectAfterMs: number, jitterMs: number, random: () => number): number {
  const base = Number.isFinite(reconnectAfterMs) ? Math.max(0, reconnectAfterMs) : 0;
  return Math.round(base + clamp01(random()) * Math.max(0, jitterMs));
}

/** Reads an HTTP `Retry-After` value (seconds or an HTTP date) as milliseconds from `nowMs`. */
export function parseRetryAfter(value: string | null | undefined, nowMs: number): number | undefined {
  if (value == null) return undefined;
  const v = value.trim();
  if (v === "") return undefined;
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - nowMs);
}

function clamp01(x: number): number {
  if (!(x >= 0)) return 0; // NaN too
  return x >= 1 ? 1 - Number.EPSILON : x;
}
