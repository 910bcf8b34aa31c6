import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, goawayDelay, parseRetryAfter } from "../../dist/index.js";

const opts = { minDelayMs: 500, maxDelayMs: 20_000 };

test("backoff window doubles per attempt, from min, capped at max", () => {
  for (let a = 0; a < 12; a++) {
    const top = Math.min(20_000, 500 * 2 ** (a + 1));
    assert.equal(backoffDelay(a, opts, () => 0), 500, `attempt ${a}: the smallest delay is min`);
    const hi = backoffDelay(a, opts, () => 0.999999999);
    assert.ok(hi <= top && hi >= top - 1, `attempt ${a}: largest ${hi}, window top ${top}`);
  }
  assert.equal(backoffDelay(3, opts, () => 0.5), Math.round(500 + 0.5 * (8000 - 500)), "attempt 3: window [500, 8000]");
});

test("backoff never exceeds max, even for absurd attempts", () => {
  for (const a of [20, 31, 64, 1000, Number.MAX_SAFE_INTEGER]) {
    const d = backoffDelay(a, opts, () => 0.9999);
    assert.ok(Number.isFinite(d) && d <= 20_000 && d >= 500, `attempt ${a}: ${d}`);
  }
});

test("backoff is full jitter: delays spread across the whole window", () => {
  let s = 42;
  const rnd = () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const a = 4; // window [500, 16000]
  const ds = Array.from({ length: 2000 }, () => backoffDelay(a, opts, rnd));
  const min = Math.min(...ds);
  const max = Math.max(...ds);
  assert.ok(min >= 500 && max <= 16_000);
  assert.ok(min < 1_500 && max > 15_000, `spread ${min}..${max}`);
  // Roughly uniform: each quarter of the window gets a fair share.
  const q = [0, 0, 0, 0];
  for (const d of ds) q[Math.min(3, Math.floor(((d - 500) / 15_500) * 4))]++;
  for (const n of q) assert.ok(n > 350 && n < 650, `quarters ${q}`);
});

test("a server-given delay is a floor, above max too", () => {
  assert.equal(backoffDelay(0, opts, () => 0, 3_000), 3_000);
  assert.equal(backoffDelay(0, opts, () => 0, 100), 500, "a floor below the backoff changes nothing");
  assert.equal(backoffDelay(10, opts, () => 0.99, 60_000), 60_000, "floor above max wins");
  assert.equal(backoffDelay(0, opts, () => 0, -5), 500);
});

test("random outside [0,1) is clamped", () => {
  assert.equal(backoffDelay(2, opts, () => NaN), 500);
  assert.ok(backoffDelay(2, opts, () => 7) <= 4_000);
});

test("goaway delay: reconnect_after_ms plus at most the jitter", () => {
  assert.equal(goawayDelay(700, 250, () => 0), 700);
  assert.equal(goawayDelay(700, 250, () => 0.5), 825);
  assert.ok(goawayDelay(700, 250, () => 0.99999) <= 950);
  assert.equal(goawayDelay(NaN, 250, () => 0), 0);
});

test("Retry-After: seconds and HTTP dates", () => {
  const now = Date.parse("2026-11-30T10:00:00Z");
  assert.equal(parseRetryAfter("3", now), 3000);
  assert.equal(parseRetryAfter(" 0 ", now), 0);
  assert.equal(parseRetryAfter("Mon, 30 Nov 2026 10:00:05 GMT", now), 5000);
  assert.equal(parseRetryAfter("Mon, 30 Nov 2026 09:00:00 GMT", now), 0);
  assert.equal(parseRetryAfter(null, now), undefined);
  assert.equal(parseRetryAfter("soon", now), undefined);
});
