// Per-room positions (epoch + last seq), `since` resume, dedup, gap and reset reporting.
// Pure: it reads envelopes and returns what the app should hear; no socket, no clock.

import type { PushMessage, ServerMsg } from "./protocol.js";

/** A message as the app receives it. */
export interface RoomMessage<B = unknown> extends PushMessage<B> {
  room: string;
  /** The numbering `seq` belongs to (from the room's `joined`/`reset`). */
  epoch: string | undefined;
  /** True for a message replayed from history after a resume (`since`), false for live ones. */
  recovered: boolean;
}

export interface JoinedInfo {
  room: string;
  /** The room's seq when membership started: live messages come above it. */
  seq: number;
  epoch: string | undefined;
  /** The `since` this join resumed from (undefined for a fresh join). */
  since: number | undefined;
  /** True when this join resumed from a position the client held. */
  resumed: boolean;
}

export interface GapInfo {
  room: string;
  from: number;
  to: number;
}

export interface ResetInfo {
  room: string;
  /** The new numbering. */
  epoch: string;
  /** The client's position in the new numbering (0: everything of it is new). */
  seq: number;
  reason: string;
  previousEpoch: string | undefined;
  previousSeq: number;
}

export type RoomEvent =
  | { type: "joined"; info: JoinedInfo }
  | { type: "message"; message: RoomMessage }
  | { type: "gap"; info: GapInfo }
  | { type: "reset"; info: ResetInfo };

/** Where the client stands in one room. */
export interface Position {
  epoch: string | undefined;
  /** Highest seq delivered to the app in `epoch` (0: none). Anything at or below is a duplicate. */
  delivered: number;
  /** Seqs at or below this need not be asked for again (the room's seq at a fresh join, a gap's end). */
  floor: number;
}

/** What to send back to resume in a room. */
export interface Resume {
  since: number;
  epoch: string | undefined;
}

interface Session {
  room: string;
  /** The `since` sent with this join, if any. */
  since: number | undefined;
  joined: boolean;
  /** Messages up to this seq, after this join's `joined`, are history replays. */
  replayUpTo: number;
}

/**
 * Tracks positions in every room the client has been in (bounded: the oldest are forgotten past
 * `maxRooms`), and filters one connection's envelopes into the events the app should see.
 *
 * Invariant: within one epoch, a seq reaches the app at most once, in increasing order.
 */
export class RoomTracker {
  private readonly positions = new Map<string, Position>();
  private session: Session | undefined;
  /** Messages dropped as duplicates since this tracker was made. */
  duplicates = 0;

  constructor(private readonly maxRooms = 64) {}

  /** The position held for `room`, if any. */
  position(room: string): Position | undefined {
    return this.positions.get(room);
  }

  /** The `since`/`epoch` to send when (re)joining `room`, or undefined for a fresh join. */
  resumeFor(room: string): Resume | undefined {
    const p = this.positions.get(room);
    if (!p || p.epoch === undefined) return undefined;
    return { since: Math.max(p.delivered, p.floor), epoch: p.epoch };
  }

  /** The room a join is in flight for, or joined. */
  get room(): string | undefined {
    return this.session?.room;
  }

  /** True once the current join has been acknowledged. */
  get joined(): boolean {
    return this.session?.joined ?? false;
  }

  /** A join for `room` is being sent (in the URL or as an op) with `resume`. */
  beginJoin(room: string, resume: Resume | undefined): void {
    this.session = { room, since: resume?.since, joined: false, replayUpTo: 0 };
  }

  /** The client left its room (or the connection is gone: positions stay). */
  endSession(): void {
    this.session = undefined;
  }

  /** Forgets the position held for `room` (the next join there is fresh). */
  forget(room: string): void {
    this.positions.delete(room);
  }

  /** Filters one envelope; returns the events for the app, in order. */
  handle(msg: ServerMsg): RoomEvent[] {
    switch (msg.type) {
      case "joined":
        return this.onJoined(msg.room, msg.seq, msg.epoch);
      case "reset":
        return this.onReset(msg.room, msg.epoch, msg.seq, msg.reason);
      case "gap":
        return this.onGap(msg.room, msg.from, msg.to);
      case "batch":
        return this.onBatch(msg.room, msg.messages);
      default:
        return [];
    }
  }

  private current(room: string): Session | undefined {
    const s = this.session;
    return s && s.room === room ? s : undefined;
  }

  private store(room: string, p: Position): void {
    this.positions.delete(room);
    this.positions.set(room, p);
    while (this.positions.size > this.maxRooms) {
      const oldest = this.positions.keys().next().value as string;
      if (oldest === this.session?.room) {
        // Never forget the room we are in: move it to the back and drop the next one.
        const cur = this.positions.get(oldest)!;
        this.positions.delete(oldest);
        this.positions.set(oldest, cur);
        continue;
      }
      this.positions.delete(oldest);
    }
  }

  private onJoined(room: string, seq: number, epoch: string | undefined): RoomEvent[] {
    const s = this.current(room);
    if (!s) return [];
    const out: RoomEvent[] = [];
    let p = this.positions.get(room);
    if (p && p.epoch !== undefined && epoch !== undefined && p.epoch !== epoch) {
      // The numbering changed and no `reset` said so first (the edge always sends one; this is
      // the fallback): the old position means nothing in the new numbering.
      out.push({
        type: "reset",
        info: { room, epoch, seq: 0, reason: "epoch_changed", previousEpoch: p.epoch, previousSeq: p.delivered },
      });
      p = { epoch, delivered: 0, floor: 0 };
      s.since = 0;
    }
    const resumed = s.since !== undefined;
    if (!p) p = { epoch, delivered: 0, floor: 0 };
    if (epoch !== undefined) p.epoch = epoch;
    if (!resumed) {
      // A fresh join: live messages come above `seq`; the next resume starts there.
      p.floor = Math.max(p.floor, seq);
    }
    this.store(room, p);
    s.joined = true;
    s.replayUpTo = resumed ? seq : 0;
    out.push({ type: "joined", info: { room, seq, epoch, since: s.since, resumed } });
    return out;
  }

  private onReset(room: string, epoch: string, seq: number, reason: string): RoomEvent[] {
    const s = this.current(room);
    if (!s) return [];
    const prev = this.positions.get(room);
    this.store(room, { epoch, delivered: seq, floor: seq });
    // The `joined` that follows carries the new epoch: what comes up to its seq is history of
    // the new numbering, replayed. A reset of a live membership has no `joined` after it:
    // what follows is live, not recovered.
    s.since = seq;
    s.replayUpTo = 0;
    return [
      {
        type: "reset",
        info: { room, epoch, seq, reason, previousEpoch: prev?.epoch, previousSeq: prev?.delivered ?? 0 },
      },
    ];
  }

  private onGap(room: string, from: number, to: number): RoomEvent[] {
    const s = this.current(room);
    if (!s) return [];
    const p = this.positions.get(room);
    if (p) p.floor = Math.max(p.floor, to);
    return [{ type: "gap", info: { room, from, to } }];
  }

  private onBatch(room: string, messages: PushMessage[]): RoomEvent[] {
    const s = this.current(room);
    if (!s || !s.joined) return [];
    const p = this.positions.get(room);
    if (!p) return [];
    const out: RoomEvent[] = [];
    for (const m of messages) {
      if (typeof m.seq !== "number" || m.seq <= p.delivered) {
        this.duplicates++;
        continue;
      }
      p.delivered = m.seq;
      out.push({
        type: "message",
        message: { ...m, room, epoch: p.epoch, recovered: m.seq <= s.replayUpTo },
      });
    }
    return out;
  }
}
