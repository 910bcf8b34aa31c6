// The connection: dispatch, WebSocket, reconnection, goaway, liveness, tokens, publishing.
// Every clock read and timer goes through `Scheduler`, every socket through the `WebSocket`
// constructor and every HTTP request through `fetch`: tests replace all three.

import { backoffDelay, goawayDelay, parseRetryAfter } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { RoomcastError } from "./errors.js";
import { CLIENT_FAULT_CODES, CloseCode, SUBPROTOCOL, deletedSeq, parseServerMsg } from "./protocol.js";
import type { ClientMsg, ServerMsg } from "./protocol.js";
import { RoomTracker } from "./rooms.js";
import type { GapInfo, JoinedInfo, ResetInfo, RoomMessage } from "./rooms.js";
import { jwtExp, refreshDelay } from "./token.js";
import { buildWsUrl, goawayTarget, normalizeDispatch, redactToken, routeRequestUrl } from "./urls.js";
import type { Target } from "./urls.js";

/** The part of the WebSocket API this client uses (browsers' WebSocket, the `ws` package's, undici's). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol?: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean?: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Timers and clock (tests pass a fake one). */
export interface Scheduler {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  now(): number;
}

export type FetchLike = (
  url: string,
  init?: { signal?: AbortSignal; headers?: Record<string, string> },
) => Promise<{ ok: boolean; status: number; headers: { get(name: string): string | null }; json(): Promise<unknown> }>;

/** Why the token callback is asked. */
export interface TokenContext {
  /** `connect`: first connection; `reconnect`: the last token was refused or expired; `refresh`: before expiry. */
  reason: "connect" | "reconnect" | "refresh";
}

/** Something with addEventListener (window, document). */
export interface EventTargetLike {
  addEventListener(type: string, fn: () => void): void;
  removeEventListener(type: string, fn: () => void): void;
}

export interface ClientOptions {
  /**
   * Dispatch endpoint(s): `http://host:8081` or `.../v1/route`. Several are tried in turn when
   * one fails. Either this or `url` (or both: `url` is then tried when dispatch fails).
   */
  dispatch?: string | string[];
  /** A fixed edge URL, `ws://host:8080/ws` (a `room` in it is replaced by the client's room). */
  url?: string;
  /** The room to join on connect. */
  room?: string;
  /** Supplies the connection token (JWT). Called before the first connection, after a refused or expired token, and before expiry. */
  token?: (ctx: TokenContext) => string | Promise<string>;
  /** The WebSocket constructor; default `globalThis.WebSocket` (Node 20: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** `fetch` for dispatch; default `globalThis.fetch`. */
  fetch?: FetchLike;
  /** Backoff window base and smallest delay (ms). Default 500. */
  minReconnectDelayMs?: number;
  /** Backoff window cap (ms). Default 20000. Close codes that say the client misbehaved wait at least this. */
  maxReconnectDelayMs?: number;
  /** Extra random delay added to a goaway's `reconnect_after_ms` (ms). Default 250. */
  goawayJitterMs?: number;
  /** A WebSocket upgrade not open after this long is abandoned (ms). Default 10000. */
  connectTimeoutMs?: number;
  /** A dispatch request not answered after this long is abandoned (ms). Default 5000. */
  dispatchTimeoutMs?: number;
  /**
   * A connection from which nothing arrived for this long is dead and replaced (ms). Default
   * 30000. The client sends a probe when the connection has been quiet for all but the last
   * third (at most 5 s) of it, so a live but quiet connection answers in time.
   */
  livenessTimeoutMs?: number;
  /** Refresh the token this long before its `exp` (ms; a third of its life for short tokens). Default 60000. */
  refreshBeforeMs?: number;
  /** A publish over the socket not answered after this long fails (ms). Default 10000. */
  publishTimeoutMs?: number;
  /** Positions kept for this many rooms (switching back resumes). Default 64. */
  maxRooms?: number;
  /** Listen to `online`/`offline` and `visibilitychange` (default: when `window`/`document` exist). */
  browserEvents?: boolean | { window?: EventTargetLike; document?: EventTargetLike & { visibilityState?: string } };
  /** Random numbers in [0, 1) for jitter. Default `Math.random`. */
  random?: () => number;
  /** Timers and clock. Default: the global ones and `Date.now`. */
  scheduler?: Scheduler;
}

export type ConnectionState = "disconnected" | "connecting" | "connected";

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
}

export interface ConnectedInfo {
  /** The WebSocket URL connected to (token redacted). */
  url: string;
  /** The edge id dispatch named, if dispatch was used. */
  edge: string | undefined;
  /** Failed attempts before this one since the last good connection. */
  attempts: number;
}

export interface DisconnectedInfo {
  code: number;
  reason: string;
  /** True if the client will reconnect on its own. */
  reconnect: boolean;
  /** When it will (ms from now), if it will. */
  delayMs: number | undefined;
}

export interface GoawayInfo {
  url: string;
  reason: string;
  reconnectAfterMs: number;
  /** Where the client goes next (the goaway's URL with the room set). */
  target: string | undefined;
}

export interface Published {
  room: string;
  seq: number;
  ts_us: number;
}

/** Events, by name. Kinds have their own events (`gift`, `chat`, `system`, `like`; others via `onKind`). */
export interface ClientEvents {
  state: StateChange;
  connected: ConnectedInfo;
  disconnected: DisconnectedInfo;
  joined: JoinedInfo;
  left: { room: string };
  switch: { from: string | undefined; to: string };
  /** Every message of the room, each at most once. */
  message: RoomMessage;
  gift: RoomMessage;
  chat: RoomMessage;
  system: RoomMessage;
  like: RoomMessage;
  /** Must-deliver seqs `from..=to` cannot be recovered (gone from history). */
  gap: GapInfo;
  /** The room's numbering restarted: the client's old position is void. */
  reset: ResetInfo;
  goaway: GoawayInfo;
  refreshed: { exp: number };
  /** The room's members over every edge: on join, then when it changes (at most every
   * `presence.interval_ms` of the edge). */
  online: { room: string; count: number };
  /**
   * A moderator deleted message `seq` of `room`: remove it if it is shown. `tombstone` is the
   * message that said so (kind `deleted`; it also reaches `message` listeners). Not emitted for
   * a tombstone that stands in a replay in place of a deleted message (nothing to remove).
   */
  deleted: { room: string; seq: number; tombstone: RoomMessage };
  error: RoomcastError;
}

const BUILTIN_KINDS = new Set(["gift", "chat", "system", "like"]);
const PUBLISH_ERRORS = new Set([
  "not_in_room",
  "bad_kind",
  "bad_body",
  "too_large",
  "publish_forbidden",
  "publish_refused",
]);
// `banned`: a join refused, or the connection taken out of its room by a moderator's ban (a
// `left` follows); either way the room is dropped, so a reconnect does not ask for it again.
const JOIN_ERRORS = new Set(["bad_room", "room_forbidden", "join_refused", "banned"]);

interface PendingPublish {
  msg: ClientMsg;
  resolve: (p: Published) => void;
  reject: (e: RoomcastError) => void;
  timer: unknown;
  sent: boolean;
}

interface Conn {
  ws: WebSocketLike;
  url: string;
  edge: string | undefined;
  opened: boolean;
  /** The HTTP status of a refused upgrade, when the WebSocket implementation says it. */
  status: number | undefined;
}

const defaultScheduler: Scheduler = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
  now: () => Date.now(),
};

/**
 * A roomcast connection that stays in its room across edge drains, restarts and network loss,
 * delivering each message of the room to the app at most once and saying explicitly what it
 * could not recover.
 */
export class RoomcastClient extends Emitter<ClientEvents> {
  private readonly opts: Required<
    Pick<
      ClientOptions,
      | "minReconnectDelayMs"
      | "maxReconnectDelayMs"
      | "goawayJitterMs"
      | "connectTimeoutMs"
      | "dispatchTimeoutMs"
      | "livenessTimeoutMs"
      | "refreshBeforeMs"
      | "publishTimeoutMs"
    >
  >;
  private readonly dispatch: string[];
  private readonly fixedUrl: string | undefined;
  private readonly WS: WebSocketConstructor;
  private readonly fetchFn: FetchLike | undefined;
  private readonly tokenFn: ClientOptions["token"];
  private readonly random: () => number;
  private readonly sched: Scheduler;
  private readonly tracker: RoomTracker;
  private readonly kindListeners = new Map<string, Set<(m: RoomMessage) => void>>();

  private _state: ConnectionState = "disconnected";
  private wanted = false;
  private _room: string | undefined;
  /** Bumped whenever the current attempt is abandoned: async steps of an old one then stop. */
  private generation = 0;
  private conn: Conn | undefined;
  /** Failed attempts since the last good connection (drives backoff). */
  private attempts = 0;
  /** Index into the targets (dispatch endpoints, then the fixed URL) tried in turn. */
  private targetIndex = 0;
  /** Where the next attempt goes instead (a goaway's URL): used once. */
  private override: Target | undefined;
  /** A fixed-URL client that followed a goaway: the edge dispatch gave it replaces the URL it
   * was configured with (that edge is going away). */
  private adoptedUrl: string | undefined;
  private lastRefreshAt: number | undefined;
  /** The online count last told to the app, per room (told again only when it changes). */
  private onlineShown = new Map<string, number>();
  private token: string | undefined;
  private tokenStale = false;
  private switchFrom: string | undefined;
  private switching = false;

  private reconnectTimer: unknown;
  private reconnectAt: number | undefined;
  private connectTimer: unknown;
  private livenessTimer: unknown;
  private refreshTimer: unknown;
  private goawayTimer: unknown;
  private goawayPlan: { at: number; delay: number } | undefined;
  private lastRx = 0;
  private probeOutstanding = false;
  /** A probe sent on a hint (offline, visible again) must be answered by then. */
  private probeDeadline: number | undefined;
  /** Probes sent on this connection whose own answer (`pong`, or `bad_message` from an edge without the op) is still due. */
  private probeAnswersDue = 0;
  private publishes: PendingPublish[] = [];
  private detachBrowser: (() => void) | undefined;

  /** Counters, for tests and dashboards. */
  readonly stats = { connects: 0, reconnects: 0, goaways: 0, duplicatesDropped: 0, deadConnections: 0 };

  constructor(private readonly options: ClientOptions) {
    super();
    const d = options.dispatch;
    this.dispatch = (d === undefined ? [] : Array.isArray(d) ? d : [d]).map((u) => normalizeDispatch(u, baseHref()));
    this.fixedUrl = options.url;
    if (this.dispatch.length === 0 && !this.fixedUrl) {
      throw new TypeError("roomcast: give `dispatch` (an http endpoint) or `url` (a ws:// URL)");
    }
    // Mistakes that no retry can fix are refused here, not retried forever.
    for (const u of this.dispatch) {
      if (!/^https?:\/\/[^/?#\s]+/.test(u)) throw new TypeError(`roomcast: dispatch must be an http(s) URL: ${u}`);
    }
    if (this.fixedUrl !== undefined && !/^wss?:\/\/[^/?#\s]+/.test(this.fixedUrl)) {
      throw new TypeError(`roomcast: url must be a ws:// or wss:// URL: ${this.fixedUrl}`);
    }
    if (options.room !== undefined) checkRoom(options.room);
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new TypeError("roomcast: no global WebSocket here (Node 20): pass `WebSocket` (e.g. from the `ws` package)");
    }
    this.WS = WS;
    this.fetchFn = options.fetch ?? ((globalThis as { fetch?: FetchLike }).fetch?.bind(globalThis) as FetchLike | undefined);
    if (this.dispatch.length > 0 && !this.fetchFn) throw new TypeError("roomcast: dispatch needs `fetch`");
    this.tokenFn = options.token;
    this.random = options.random ?? Math.random;
    this.sched = options.scheduler ?? defaultScheduler;
    this.tracker = new RoomTracker(options.maxRooms ?? 64);
    this._room = options.room;
    const min = options.minReconnectDelayMs ?? 500;
    this.opts = {
      minReconnectDelayMs: min,
      maxReconnectDelayMs: Math.max(min, options.maxReconnectDelayMs ?? 20_000),
      goawayJitterMs: options.goawayJitterMs ?? 250,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      dispatchTimeoutMs: options.dispatchTimeoutMs ?? 5_000,
      livenessTimeoutMs: options.livenessTimeoutMs ?? 30_000,
      refreshBeforeMs: options.refreshBeforeMs ?? 60_000,
      publishTimeoutMs: options.publishTimeoutMs ?? 10_000,
    };
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** The room the client is in or joining (undefined after `leave`). */
  get room(): string | undefined {
    return this._room;
  }

  /** The position held for a room: its epoch and the last seq delivered to the app. */
  position(room: string = this._room ?? ""): { epoch: string | undefined; seq: number } | undefined {
    const p = this.tracker.position(room);
    return p && { epoch: p.epoch, seq: p.delivered };
  }

  /** Listens to messages of one kind (for kinds beyond gift/chat/system/like). Returns the remover. */
  onKind<B = unknown>(kind: string, fn: (m: RoomMessage<B>) => void): () => void {
    let set = this.kindListeners.get(kind);
    if (!set) {
      set = new Set();
      this.kindListeners.set(kind, set);
    }
    const f = fn as (m: RoomMessage) => void;
    set.add(f);
    return () => set!.delete(f);
  }

  /** Starts connecting (and keeps the connection up until `disconnect`). */
  connect(): void {
    if (this.wanted) return;
    this.wanted = true;
    this.attachBrowser();
    this.startAttempt();
  }

  /** Closes the connection and stops reconnecting. Positions are kept: `connect` resumes. */
  disconnect(): void {
    this.wanted = false;
    this.detachBrowser?.();
    this.detachBrowser = undefined;
    this.generation++;
    this.clearTimers();
    this.override = undefined;
    const c = this.conn;
    this.conn = undefined;
    if (c) {
      detach(c.ws);
      try {
        c.ws.close(CloseCode.Normal, "client disconnect");
      } catch {
        /* already closed */
      }
    }
    this.tracker.endSession();
    this.failPublishes("not_connected", "disconnected");
    this.setState("disconnected");
  }

  /**
   * Moves to another room (the protocol's `join`/`switch`; a connection is in one room at a
   * time). Coming back to a room resumes from the position held for it.
   */
  switch(room: string): void {
    checkRoom(room);
    if (room === this._room && (this.tracker.room === room || !this.isOpen())) return;
    this.switchFrom = this._room;
    this.switching = true;
    this._room = room;
    if (this.isOpen()) {
      const resume = this.tracker.resumeFor(room);
      this.tracker.beginJoin(room, resume);
      this.sendRaw({ op: "join", room, ...(resume ? { since: resume.since, ...(resume.epoch ? { epoch: resume.epoch } : {}) } : {}) });
    }
  }

  /** Alias of `switch`, for symmetry with `leave`. */
  join(room: string): void {
    this.switch(room);
  }

  /** Leaves the current room; the connection stays. */
  leave(): void {
    if (this._room === undefined) return;
    this._room = undefined;
    this.switching = false;
    this.tracker.endSession();
    if (this.isOpen()) this.sendRaw({ op: "leave" });
  }

  /**
   * Publishes to the current room over the socket (kinds the token or config allow clients;
   * gifts usually go through the back end's publish API). Publishes are sent one at a time so
   * each answer matches its request.
   */
  publish(kind: string, body: unknown): Promise<Published> {
    return new Promise<Published>((resolve, reject) => {
      if (!this.isOpen() || !this.tracker.joined) {
        reject(new RoomcastError("not_connected", "publish: not connected to a room", "publish"));
        return;
      }
      this.publishes.push({ msg: { op: "publish", kind, body }, resolve, reject, timer: undefined, sent: false });
      this.pumpPublishes();
    });
  }

  // ---- attempts ---------------------------------------------------------------------------

  private startAttempt(): void {
    if (!this.wanted) return;
    this.reconnectTimer = undefined;
    this.reconnectAt = undefined;
    const gen = ++this.generation;
    this.setState("connecting");
    void this.attempt(gen);
  }

  private async attempt(gen: number): Promise<void> {
    // 1. The token.
    let token: string | undefined;
    if (this.tokenFn) {
      if (this.token === undefined || this.tokenStale) {
        try {
          const reason = this.token === undefined ? "connect" : "reconnect";
          token = await this.tokenFn({ reason });
        } catch (e) {
          if (gen !== this.generation) return;
          this.emitError(new RoomcastError("token", `token callback failed: ${String(e)}`, "token"));
          return this.scheduleReconnect(this.nextDelay(), 0, "token callback failed", false);
        }
        if (gen !== this.generation) return;
        this.token = token;
        this.tokenStale = false;
      }
      token = this.token;
    }
    // 2. Where to connect.
    const room = this._room;
    const fromGoaway = this.override !== undefined;
    const target = this.override ?? this.currentTarget();
    this.override = undefined;
    let base: string;
    let edge: string | undefined;
    if (target.kind === "dispatch") {
      const r = await this.route(target.url, room);
      if (gen !== this.generation) return;
      if ("error" in r) {
        this.emitError(r.error);
        this.rotateTarget();
        return this.scheduleReconnect(this.nextDelay(r.floorMs), 0, r.error.message, false);
      }
      base = r.url;
      edge = r.edge;
      if (fromGoaway && this.dispatch.length === 0) this.adoptedUrl = base;
    } else {
      base = target.url;
    }
    // 3. The socket.
    const resume = room === undefined ? undefined : this.tracker.resumeFor(room);
    let url: string;
    try {
      url = buildWsUrl(base, { room, since: resume?.since, epoch: resume?.epoch, token });
    } catch {
      this.emitError(new RoomcastError("dispatch", `unusable edge URL: ${base}`, "dispatch"));
      this.rotateTarget();
      return this.scheduleReconnect(this.nextDelay(), 0, "unusable edge URL", false);
    }
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, SUBPROTOCOL);
    } catch (e) {
      this.emitError(new RoomcastError("handshake", `WebSocket: ${String(e)}`, "handshake"));
      this.rotateTarget();
      return this.scheduleReconnect(this.nextDelay(), 0, "WebSocket constructor failed", false);
    }
    const conn: Conn = { ws, url, edge, opened: false, status: undefined };
    this.conn = conn;
    if (room !== undefined) this.tracker.beginJoin(room, resume);
    else this.tracker.endSession();
    ws.onopen = () => this.onOpen(conn);
    ws.onmessage = (ev) => this.onMessage(conn, ev.data);
    ws.onclose = (ev) => this.onClose(conn, ev.code, ev.reason ?? "");
    ws.onerror = (ev) => {
      // Node's `ws` says why an upgrade failed ("Unexpected server response: 401"); browsers do not.
      const m = /Unexpected server response: (\d{3})/.exec(errorText(ev));
      if (m) conn.status = Number(m[1]);
    };
    // Server pings are traffic too, where the implementation shows them (the `ws` package).
    const on = (ws as unknown as { on?: (ev: string, fn: () => void) => void }).on;
    if (typeof on === "function") on.call(ws, "ping", () => this.onTraffic(conn));
    this.connectTimer = this.sched.setTimeout(() => {
      if (this.conn !== conn || conn.opened) return;
      this.abandon(conn, "connect timeout");
    }, this.opts.connectTimeoutMs);
  }

  private async route(
    url: string,
    room: string | undefined,
  ): Promise<{ url: string; edge: string | undefined } | { error: RoomcastError; floorMs: number }> {
    const req = routeRequestUrl(url, room);
    const ac = typeof AbortController === "function" ? new AbortController() : undefined;
    const timer = this.sched.setTimeout(() => ac?.abort(), this.opts.dispatchTimeoutMs);
    try {
      const res = await this.fetchFn!(req, ac ? { signal: ac.signal } : {});
      const floorMs = parseRetryAfter(res.headers.get("retry-after"), this.sched.now()) ?? 0;
      if (!res.ok) {
        return {
          error: new RoomcastError(`http_${res.status}`, `dispatch ${req}: HTTP ${res.status}`, "dispatch", undefined, res.status),
          floorMs,
        };
      }
      const body = (await res.json()) as { url?: unknown; edge?: unknown };
      if (typeof body?.url !== "string") {
        return { error: new RoomcastError("dispatch", `dispatch ${req}: no url in the answer`, "dispatch"), floorMs: 0 };
      }
      return { url: body.url, edge: typeof body.edge === "string" ? body.edge : undefined };
    } catch (e) {
      return { error: new RoomcastError("dispatch", `dispatch ${req}: ${String(e)}`, "dispatch"), floorMs: 0 };
    } finally {
      this.sched.clearTimeout(timer);
    }
  }

  private targets(): Target[] {
    const t: Target[] = this.dispatch.map((url) => ({ kind: "dispatch" as const, url }));
    const url = this.adoptedUrl ?? this.fixedUrl;
    if (url) t.push({ kind: "ws", url });
    return t;
  }

  private currentTarget(): Target {
    const t = this.targets();
    return t[this.targetIndex % t.length]!;
  }

  private rotateTarget(): void {
    this.targetIndex = (this.targetIndex + 1) % this.targets().length;
  }

  private nextDelay(floorMs = 0): number {
    const d = backoffDelay(
      this.attempts,
      { minDelayMs: this.opts.minReconnectDelayMs, maxDelayMs: this.opts.maxReconnectDelayMs },
      this.random,
      floorMs,
    );
    this.attempts++;
    return d;
  }

  private scheduleReconnect(delayMs: number, code: number, reason: string, emitDisconnected = true): void {
    this.clearConnTimers();
    if (!this.wanted) return;
    this.sched.clearTimeout(this.reconnectTimer);
    this.reconnectAt = this.sched.now() + delayMs;
    this.reconnectTimer = this.sched.setTimeout(() => {
      this.stats.reconnects++;
      this.startAttempt();
    }, delayMs);
    if (emitDisconnected) this.emit("disconnected", { code, reason, reconnect: true, delayMs });
    this.setState("connecting");
  }

  // ---- the open connection ----------------------------------------------------------------

  private isOpen(): boolean {
    return this.conn !== undefined && this.conn.opened;
  }

  private onOpen(conn: Conn): void {
    if (this.conn !== conn) return;
    conn.opened = true;
    this.probeAnswersDue = 0;
    this.sched.clearTimeout(this.connectTimer);
    this.stats.connects++;
    this.lastRx = this.sched.now();
    this.armLiveness(conn);
    this.scheduleRefresh();
    this.setState("connected");
    this.emit("connected", { url: redactToken(conn.url), edge: conn.edge, attempts: this.attempts });
    if (this._room === undefined) this.attempts = 0;
  }

  private onTraffic(conn: Conn): void {
    if (this.conn !== conn) return;
    this.lastRx = this.sched.now();
    this.probeOutstanding = false;
    this.probeDeadline = undefined;
  }

  private onMessage(conn: Conn, data: unknown): void {
    if (this.conn !== conn) return;
    this.onTraffic(conn);
    const text = typeof data === "string" ? data : decodeText(data);
    if (text === undefined) return;
    const msg = parseServerMsg(text);
    if (!msg) return;
    this.handle(conn, msg);
  }

  private handle(conn: Conn, msg: ServerMsg): void {
    switch (msg.type) {
      case "batch":
      case "joined":
      case "reset":
      case "gap": {
        const before = this.tracker.duplicates;
        for (const ev of this.tracker.handle(msg)) {
          if (this.conn !== conn) return; // a listener disconnected or switched
          switch (ev.type) {
            case "message":
              this.deliver(ev.message);
              break;
            case "joined":
              this.attempts = 0;
              this.emit("joined", ev.info);
              if (this.switching && ev.info.room === this._room) {
                this.switching = false;
                this.emit("switch", { from: this.switchFrom, to: ev.info.room });
              }
              break;
            case "gap":
              this.emit("gap", ev.info);
              break;
            case "reset":
              this.emit("reset", ev.info);
              break;
          }
        }
        this.stats.duplicatesDropped += this.tracker.duplicates - before;
        if ((msg.type === "batch" || msg.type === "joined") && typeof msg.online === "number" && msg.room === this._room) {
          if (this.onlineShown.get(msg.room) !== msg.online) {
            this.onlineShown.set(msg.room, msg.online);
            this.emit("online", { room: msg.room, count: msg.online });
          }
        }
        return;
      }
      case "left":
        this.emit("left", { room: msg.room });
        return;
      case "published": {
        const p = this.publishes[0];
        if (p?.sent) {
          this.publishes.shift();
          this.sched.clearTimeout(p.timer);
          p.resolve({ room: msg.room, seq: msg.seq, ts_us: msg.ts_us });
          this.pumpPublishes();
        }
        return;
      }
      case "error":
        return this.onServerError(msg.code, msg.message);
      case "goaway":
        return this.onGoaway(conn, msg.url, msg.reason, msg.reconnect_after_ms);
      case "refreshed":
        this.emit("refreshed", { exp: msg.exp });
        this.scheduleRefresh(msg.exp);
        return;
      case "pong":
        if (this.probeAnswersDue > 0) this.probeAnswersDue--;
        return;
    }
  }

  private deliver(m: RoomMessage): void {
    this.emit("message", m);
    const target = deletedSeq(m);
    if (target !== undefined && target !== m.seq) this.emit("deleted", { room: m.room, seq: target, tombstone: m });
    if (BUILTIN_KINDS.has(m.kind)) this.emit(m.kind as "gift", m);
    const set = this.kindListeners.get(m.kind);
    if (set) {
      for (const fn of [...set]) {
        try {
          fn(m);
        } catch (e) {
          queueMicrotask(() => {
            throw e;
          });
        }
      }
    }
  }

  private onServerError(code: string, message: string): void {
    if (code === "bad_message" && this.probeAnswersDue > 0) {
      // The answer to our liveness probe from an edge without a `ping` op: it proved the
      // connection alive, which is all it was for.
      this.probeAnswersDue--;
      return;
    }
    const err = new RoomcastError(code, message, "server");
    if (PUBLISH_ERRORS.has(code) || (code === "rate_limited" && this.publishes[0]?.sent)) {
      const p = this.publishes[0];
      if (p?.sent) {
        this.publishes.shift();
        this.sched.clearTimeout(p.timer);
        p.reject(new RoomcastError(code, message, "publish"));
        this.pumpPublishes();
        return;
      }
    }
    if (JOIN_ERRORS.has(code)) {
      // The join was refused. The edge keeps the connection where it was: after a refused
      // switch, that is the previous room, which the client goes back to (a join with its
      // position: anything published meanwhile is replayed); after a refused first join, no
      // room (and a reconnect would be refused too: the room is dropped).
      const back = this.switching ? this.switchFrom : undefined;
      this.switching = false;
      this.tracker.endSession();
      this._room = undefined;
      if (back !== undefined && back !== this.tracker.room) {
        this.emitError(err);
        this.switch(back);
        this.switching = false;
        return;
      }
    }
    if (code === "refresh_refused") this.tokenStale = true;
    if (code === "token_expired") this.tokenStale = true;
    this.emitError(err);
  }

  private onGoaway(conn: Conn, url: string, reason: string, reconnectAfterMs: number): void {
    this.stats.goaways++;
    const target = goawayTarget(url, this._room, conn.url);
    const delay = goawayDelay(reconnectAfterMs, this.opts.goawayJitterMs, this.random);
    if (target) this.override = target;
    this.goawayPlan = { at: this.sched.now(), delay };
    this.emit("goaway", { url, reason, reconnectAfterMs, target: target && redactToken(target.url) });
    // The edge closes right after (1001); if it does not, leave at the planned moment anyway.
    this.sched.clearTimeout(this.goawayTimer);
    this.goawayTimer = this.sched.setTimeout(() => {
      if (this.conn === conn) this.abandon(conn, "goaway", CloseCode.GoingAway);
    }, delay);
  }

  private onClose(conn: Conn, code: number, reason: string): void {
    if (this.conn !== conn) return;
    this.conn = undefined;
    detach(conn.ws);
    this.tracker.endSession();
    this.failPublishes("disconnected", `connection closed (${code})`);
    this.clearConnTimers();
    if (!this.wanted) {
      this.setState("disconnected");
      return;
    }
    if (code === CloseCode.Kicked) {
      // Disconnected by a moderator: coming back on our own would undo it. Positions are
      // kept: the app may `connect()` again (and tell the user) if it decides to.
      this.wanted = false;
      this.goawayPlan = undefined;
      this.detachBrowser?.();
      this.detachBrowser = undefined;
      this.emitError(new RoomcastError("close_4002", `disconnected by a moderator: ${reason}`, "close", code));
      this.emit("disconnected", { code, reason, reconnect: false, delayMs: undefined });
      this.setState("disconnected");
      return;
    }
    const plan = this.goawayPlan;
    this.goawayPlan = undefined;
    if (plan) {
      const left = Math.max(0, plan.at + plan.delay - this.sched.now());
      return this.scheduleReconnect(left, code, reason || "goaway");
    }
    if (!conn.opened) {
      // The upgrade failed. Browsers do not say why; a refused token is one likely cause, so
      // the next attempt asks for a fresh one (Node's `ws` tells 401 apart).
      if (conn.status === undefined || conn.status === 401) this.tokenStale = true;
      const status = conn.status;
      this.emitError(
        new RoomcastError(
          status ? `http_${status}` : "handshake",
          `connect to ${redactToken(conn.url)} failed${status ? `: HTTP ${status}` : ""}`,
          "handshake",
          code,
          status,
        ),
      );
      this.rotateTarget();
      // 403 (a room or origin the token does not allow) and 400 (a bad room) will not change
      // by retrying soon: back off as far as the bounds allow.
      const refused = status === 403 || status === 400;
      return this.scheduleReconnect(
        this.nextDelay(refused ? this.opts.maxReconnectDelayMs : 0),
        code,
        reason || "connect failed",
      );
    }
    if (code === CloseCode.TokenExpired) {
      this.tokenStale = true;
      this.emitError(new RoomcastError("close_4001", "token expired: reconnecting with a new token", "close", code));
      return this.scheduleReconnect(this.nextDelay(), code, reason);
    }
    if (CLIENT_FAULT_CODES.has(code)) {
      // The edge says this client misbehaved; retrying fast would only repeat it.
      this.emitError(new RoomcastError(`close_${code}`, `closed by the edge: ${code} ${reason}`, "close", code));
      return this.scheduleReconnect(this.nextDelay(this.opts.maxReconnectDelayMs), code, reason);
    }
    if (code === CloseCode.SlowConsumer || code === CloseCode.TryAgainLater) {
      // Reconnect with `since`: nothing must-deliver is lost (1013: the same `since`).
      this.emitError(new RoomcastError(`close_${code}`, `closed by the edge: ${code} ${reason}`, "close", code));
    }
    this.scheduleReconnect(this.nextDelay(), code, reason);
  }

  /** Gives up on a connection without waiting for its close handshake (dead, timed out, goaway). */
  private abandon(conn: Conn, reason: string, code: number = CloseCode.Abnormal): void {
    if (this.conn !== conn) return;
    detach(conn.ws);
    try {
      const t = (conn.ws as unknown as { terminate?: () => void }).terminate;
      if (typeof t === "function") t.call(conn.ws);
      else conn.ws.close(CloseCode.Normal, reason);
    } catch {
      /* already closed */
    }
    this.onClose(conn, code, reason);
  }

  // ---- liveness -----------------------------------------------------------------------------

  private probeWindow(): number {
    return Math.min(5_000, Math.floor(this.opts.livenessTimeoutMs / 3));
  }

  /**
   * The liveness timer: one pending timeout per connection, not re-armed per message (traffic
   * only moves `lastRx`); each time it fires it looks at the silence so far and probes, declares
   * the connection dead, or sleeps until the next moment that matters.
   */
  private armLiveness(conn: Conn): void {
    this.sched.clearTimeout(this.livenessTimer);
    this.livenessTimer = undefined;
    if (this.conn !== conn || !conn.opened) return;
    const now = this.sched.now();
    let deadAt = this.lastRx + this.opts.livenessTimeoutMs;
    if (this.probeDeadline !== undefined) deadAt = Math.min(deadAt, this.probeDeadline);
    if (now >= deadAt) return this.dead(conn);
    const probeAt = this.lastRx + this.opts.livenessTimeoutMs - this.probeWindow();
    if (!this.probeOutstanding && now >= probeAt) this.sendProbe();
    const next = this.probeOutstanding ? deadAt : probeAt;
    this.livenessTimer = this.sched.setTimeout(() => this.armLiveness(conn), Math.max(0, next - now));
  }

  private sendProbe(): void {
    this.probeOutstanding = true;
    this.probeAnswersDue++;
    this.sendRaw({ op: "ping" });
  }

  /** Probes now (back online, page visible again): dead unless something arrives within the probe window. */
  private probeNow(conn: Conn): void {
    if (this.conn !== conn || !conn.opened) return;
    this.sendProbe();
    this.probeDeadline = this.sched.now() + this.probeWindow();
    this.armLiveness(conn);
  }

  private dead(conn: Conn): void {
    this.stats.deadConnections++;
    this.emitError(
      new RoomcastError("dead_connection", `nothing received for ${this.sched.now() - this.lastRx} ms`, "liveness"),
    );
    this.abandon(conn, "dead connection");
  }

  // ---- tokens -------------------------------------------------------------------------------

  private scheduleRefresh(exp?: number): void {
    this.sched.clearTimeout(this.refreshTimer);
    if (!this.tokenFn || this.token === undefined) return;
    const e = exp ?? jwtExp(this.token);
    if (e === undefined) return;
    // At least 5 s between refreshes: a token callback that returns a token no newer than the
    // last (a cache) would otherwise be asked again and again as expiry nears.
    const floor = this.lastRefreshAt === undefined ? 0 : this.lastRefreshAt + 5_000 - this.sched.now();
    const delay = Math.max(refreshDelay(e, this.sched.now(), this.opts.refreshBeforeMs), floor);
    const conn = this.conn;
    this.refreshTimer = this.sched.setTimeout(() => void this.refresh(conn), delay);
  }

  private async refresh(conn: Conn | undefined): Promise<void> {
    if (!conn || this.conn !== conn || !this.tokenFn) return;
    this.lastRefreshAt = this.sched.now();
    let token: string;
    try {
      token = await this.tokenFn({ reason: "refresh" });
    } catch (e) {
      this.emitError(new RoomcastError("token", `token refresh failed: ${String(e)}`, "token"));
      // Try again shortly; at `exp` the edge closes with 4001 and the reconnect asks again.
      if (this.conn === conn) this.refreshTimer = this.sched.setTimeout(() => void this.refresh(conn), 5_000);
      return;
    }
    if (this.conn !== conn) {
      this.token = token;
      return;
    }
    this.token = token;
    this.tokenStale = false;
    this.sendRaw({ op: "refresh", token });
  }

  // ---- publishing ---------------------------------------------------------------------------

  private pumpPublishes(): void {
    const p = this.publishes[0];
    if (!p || p.sent) return;
    if (!this.isOpen()) return this.failPublishes("not_connected", "not connected");
    p.sent = true;
    this.sendRaw(p.msg);
    p.timer = this.sched.setTimeout(() => {
      if (this.publishes[0] !== p) return;
      this.publishes.shift();
      p.reject(new RoomcastError("timeout", "publish: no answer in time", "publish"));
      this.pumpPublishes();
    }, this.opts.publishTimeoutMs);
  }

  private failPublishes(code: string, message: string): void {
    const ps = this.publishes;
    this.publishes = [];
    for (const p of ps) {
      this.sched.clearTimeout(p.timer);
      p.reject(new RoomcastError(code, `publish: ${message}`, "publish"));
    }
  }

  // ---- browsers -----------------------------------------------------------------------------

  private attachBrowser(): void {
    const be = this.options.browserEvents;
    if (be === false) return;
    const g = globalThis as { window?: EventTargetLike; document?: EventTargetLike & { visibilityState?: string } };
    const win = typeof be === "object" ? be.window : g.window;
    const doc = typeof be === "object" ? be.document : g.document;
    if (!win && !doc) return;
    const wake = () => {
      if (!this.wanted) return;
      if (this.conn?.opened) {
        // Back from sleep or a network change: check the connection now, not at the next probe.
        this.probeNow(this.conn);
      } else if (this.reconnectTimer !== undefined) {
        this.sched.clearTimeout(this.reconnectTimer);
        this.reconnectTimer = undefined;
        this.startAttempt();
      }
    };
    const offline = () => {
      if (this.wanted && this.conn?.opened) this.probeNow(this.conn);
    };
    const visibility = () => {
      if (doc?.visibilityState === undefined || doc.visibilityState === "visible") wake();
    };
    win?.addEventListener("online", wake);
    win?.addEventListener("offline", offline);
    doc?.addEventListener("visibilitychange", visibility);
    this.detachBrowser = () => {
      win?.removeEventListener("online", wake);
      win?.removeEventListener("offline", offline);
      doc?.removeEventListener("visibilitychange", visibility);
    };
  }

  // ---- small things ---------------------------------------------------------------------------

  private sendRaw(msg: ClientMsg): void {
    const c = this.conn;
    if (!c || !c.opened) return;
    try {
      c.ws.send(JSON.stringify(msg));
    } catch {
      /* closing: onclose follows */
    }
  }

  private emitError(e: RoomcastError): void {
    this.emit("error", e);
  }

  private setState(s: ConnectionState): void {
    if (s === this._state) return;
    const previous = this._state;
    this._state = s;
    this.emit("state", { state: s, previous });
  }

  private clearConnTimers(): void {
    for (const t of [this.connectTimer, this.livenessTimer, this.refreshTimer, this.goawayTimer]) {
      this.sched.clearTimeout(t);
    }
    this.connectTimer = this.livenessTimer = this.refreshTimer = this.goawayTimer = undefined;
    this.probeOutstanding = false;
    this.probeDeadline = undefined;
  }

  private clearTimers(): void {
    this.clearConnTimers();
    this.sched.clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.reconnectAt = undefined;
    this.goawayPlan = undefined;
  }

  /** When the next attempt starts (ms since the epoch of the scheduler's clock), if one is planned. */
  get nextAttemptAt(): number | undefined {
    return this.reconnectAt;
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}

function errorText(ev: unknown): string {
  if (ev && typeof ev === "object") {
    const e = ev as { message?: unknown; error?: { message?: unknown } };
    if (typeof e.message === "string") return e.message;
    if (e.error && typeof e.error.message === "string") return e.error.message;
  }
  return "";
}

function decodeText(data: unknown): string | undefined {
  try {
    if (data instanceof ArrayBuffer) return new TextDecoder().decode(new Uint8Array(data));
    if (ArrayBuffer.isView(data)) return new TextDecoder().decode(data as Uint8Array);
  } catch {
    return undefined;
  }
  return undefined;
}

function baseHref(): string | undefined {
  const loc = (globalThis as { location?: { href?: string } }).location;
  return typeof loc?.href === "string" ? loc.href : undefined;
}

/** Room names the edge accepts (1 to 64 bytes of A-Z a-z 0-9 _ . : -). */
function checkRoom(room: string): void {
  if (!/^[A-Za-z0-9_.:-]{1,64}$/.test(room)) {
    throw new TypeError(`roomcast: bad room name ${JSON.stringify(room)}: 1 to 64 of A-Z a-z 0-9 _ . : -`);
  }
}
