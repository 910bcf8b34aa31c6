// Test doubles: a clock with timers, a WebSocket, fetch. No real sockets, no real time.

/** A scheduler whose time moves only when the test says. */
export class FakeClock {
  constructor(start = 1_800_000_000_000) {
    this.t = start;
    this.nextId = 1;
    this.timers = new Map();
  }
  now() {
    return this.t;
  }
  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn, id });
    return id;
  }
  clearTimeout(id) {
    this.timers.delete(id);
  }
  /** Runs every timer due within `ms`, in time order, letting promises settle between them. */
  async advance(ms) {
    const end = this.t + ms;
    await settle();
    for (;;) {
      let next;
      for (const tm of this.timers.values()) {
        if (tm.at <= end && (!next || tm.at < next.at || (tm.at === next.at && tm.id < next.id))) next = tm;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
      await settle();
    }
    this.t = end;
    await settle();
  }
  /** Milliseconds until the earliest timer, or undefined. */
  nextDelay() {
    let min;
    for (const tm of this.timers.values()) if (min === undefined || tm.at < min) min = tm.at;
    return min === undefined ? undefined : min - this.t;
  }
}

/** Lets every queued promise continuation run. */
export async function settle() {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

/** A WebSocket the test drives: `open()`, `recv(obj)`, `serverClose(code)`. */
export class FakeWebSocket {
  static all = [];
  static reset() {
    FakeWebSocket.all = [];
  }
  static get last() {
    return FakeWebSocket.all[FakeWebSocket.all.length - 1];
  }
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedByClient = undefined;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.all.push(this);
  }
  get params() {
    return new URL(this.url).searchParams;
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data));
  }
  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = 3;
  }
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  recv(obj) {
    this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
  fail(message = "") {
    this.onerror?.({ message });
    this.serverClose(1006);
  }
}

/**
 * A fetch for dispatch: `answer(url)` returns `{status, body, headers}`; every requested URL is
 * recorded in `calls`.
 */
export function fakeFetch(answer) {
  const f = async (url) => {
    f.calls.push(url);
    const a = await answer(url);
    const headers = new Map(Object.entries(a.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    return {
      ok: a.status >= 200 && a.status < 300,
      status: a.status,
      headers: { get: (n) => headers.get(n.toLowerCase()) ?? null },
      json: async () => a.body,
    };
  };
  f.calls = [];
  return f;
}

/** A dispatch that sends everyone to `ws://edge-N:8080/ws?room=R`, N from `edgeOf(url)`. */
export function routeTo(edgeOf = () => 1) {
  return fakeFetch((url) => {
    const u = new URL(url);
    const room = u.searchParams.get("room");
    const n = edgeOf(u);
    return { status: 200, body: { url: `ws://edge-${n}:8080/ws${room ? `?room=${room}` : ""}`, edge: `edge-${n}` } };
  });
}

/** A random source that returns the given values in turn, then repeats the last. */
export function seq(...values) {
  let i = 0;
  return () => values[Math.min(i++, values.length - 1)];
}

export function batch(room, ...seqs) {
  return {
    type: "batch",
    room,
    messages: seqs.map((s) => ({ seq: s, ts_us: 1_700_000_000_000_000 + s, kind: "gift", user: "u", body: { n: s } })),
  };
}
