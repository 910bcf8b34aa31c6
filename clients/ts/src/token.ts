// Connection tokens: reading `exp` (never verifying: the edge does that) and when to refresh.

/** The `exp` claim of a JWT (seconds since the Unix epoch), or undefined if it has none or is not a JWT. */
export function jwtExp(token: string): number | undefined {
  const parts = token.split(".");
  if (parts.length !== 3) return undefined;
  try {
    const json = JSON.parse(base64UrlDecode(parts[1]!)) as { exp?: unknown };
    return typeof json.exp === "number" && Number.isFinite(json.exp) ? json.exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * When to refresh a token expiring at `expSec`, in ms from `nowMs`: `refreshBeforeMs` ahead of
 * expiry, or at two thirds of the remaining life for short tokens; never negative.
 */
export function refreshDelay(expSec: number, nowMs: number, refreshBeforeMs: number): number {
  const left = expSec * 1000 - nowMs;
  if (left <= 0) return 0;
  const ahead = Math.min(refreshBeforeMs, left / 3);
  return Math.max(0, Math.floor(left - ahead));
}

function base64UrlDecode(s: string): string {
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}
