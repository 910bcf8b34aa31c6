// The roomcast wire protocol (docs/PROTOCOL.md), JSON subprotocol: types and parsing only.
// Nothing here opens a socket or reads the clock.

/** The JSON subprotocol this client speaks. */
export const SUBPROTOCOL = "roomcast.json.v1";

/** One message of a room, as the edge numbers it. */
export interface PushMessage<B = unknown> {
  seq: number;
  ts_us: number;
  kind: string;
  user: string;
  body: B;
}

/** Server-to-client envelopes (`type` field). */
export type ServerMsg =
  | { type: "batch"; room: string; messages: PushMessage[]; online?: number }
  | { type: "joined"; room: string; seq: number; epoch?: string; online?: number }
  | { type: "left"; room: string }
  | { type: "published"; room: string; seq: number; ts_us: number }
  | { type: "error"; code: string; message: string }
  | { type: "goaway"; url: string; reason: string; reconnect_after_ms: number }
  | { type: "gap"; room: string; from: number; to: number }
  | { type: "refreshed"; exp: number }
  | { type: "reset"; room: string; epoch: string; seq: number; reason: string }
  | { type: "pong" };

/** Client-to-server signalling (`op` field). */
export type ClientMsg =
  | { op: "join"; room: string; since?: number; epoch?: string }
  | { op: "leave" }
  | { op: "publish"; kind: string; body: unknown }
  | { op: "refresh"; token: string }
  | { op: "ping" };

/** WebSocket close codes the edge sends, and what this client does about each. */
export const CloseCode = {
  /** Echo of our own normal close. */
  Normal: 1000,
  /** Edge draining, shutting down, or idle timeout: reconnect (through the goaway's URL if one came). */
  GoingAway: 1001,
  /** Protocol error: a client bug; reconnect only at the slowest pace. */
  ProtocolError: 1002,
  Unsupported: 1003,
  /** Abnormal closure (no close frame): the network or the process went away. */
  Abnormal: 1006,
  InvalidData: 1007,
  /** Signalling flood. */
  PolicyViolation: 1008,
  MessageTooBig: 1009,
  /** Try again later: a `since` replay over the shard's budget; retry with the same `since`. */
  TryAgainLater: 1013,
  /** Slow consumer: reconnect with `since`. */
  SlowConsumer: 4000,
  /** Token expired without a refresh: fetch a new token and reconnect. */
  TokenExpired: 4001,
  /** Disconnected by a moderator: the client stops (no reconnect); the app decides what next. */
  Kicked: 4002,
} as const;

/**
 * The kind of a moderator's tombstone. Its body is `{"seq": N}`: remove message N of the room
 * if it is shown, never show the tombstone itself. Live, it has a seq of its own; in a replay
 * one stands in place of each deleted message (then N is its own seq: nothing to remove).
 */
export const DELETED_KIND = "deleted";

/** For a tombstone, the seq of the message it deletes; `undefined` for any other message. */
export function deletedSeq(m: { kind: string; body: unknown }): number | undefined {
  if (m.kind !== DELETED_KIND || typeof m.body !== "object" || m.body === null) return undefined;
  const seq = (m.body as { seq?: unknown }).seq;
  return typeof seq === "number" ? seq : undefined;
}

/** Close codes that say the client itself misbehaved: retrying fast would only repeat it. */
export const CLIENT_FAULT_CODES: ReadonlySet<number> = new Set([1002, 1003, 1007, 1008, 1009]);

/** Parses one text frame into a server envelope; `null` for anything not an envelope. */
export function parseServerMsg(text: string): ServerMsg | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof v !== "object" || v === null) return null;
  const t = (v as { type?: unknown }).type;
  if (typeof t !== "string") return null;
  return v as ServerMsg;
}
