import { test, beforeEach } from "node:test";
import assert from "node:assert/strict";
import { RoomcastClient } from "../../dist/index.js";
import { FakeClock, FakeWebSocket, batch, fakeFetch, routeTo, seq, settle } from "./fakes.mjs";

beforeEach(() => FakeWebSocket.reset());

/** A client on fakes, with everything it tells the app recorded in `log`. */
function make(extra = {}) {
  const clock = new FakeClock();
  const fetch = extra.fetch ?? routeTo();
  const c = new RoomcastClient({
    dispatch: "http://dispatch.test:8081",
    room: "lobby",
    WebSocket: FakeWebSocket,
    fetch,
    scheduler: clock,
    random: () => 0.5,
    browserEvents: false,
    minReconnectDelayMs: 500,
    maxReconnectDelayMs: 20_000,
    ...extra,
  });
  const log = { messages: [], gaps: [], resets: [], errors: [], joined: [], disconnected: [], goaways: [], states: [] };
  c.on("message", (m) => log.messages.push(m));
  c.on("gap", (g) => log.gaps.push(g));
  c.on("reset", (r) => log.resets.push(r));
  c.on("error", (e) => log.errors.push(e));
  c.on("joined", (j) => log.joined.push(j));
  c.on("disconnected", (d) => log.disconnected.push(d));
  c.on("goaway", (g) => log.goaways.push(g));
  c.on("state", (s) => log.states.push(s.state));
  return { c, clock, fetch, log };
}

/** Opens the newest socket and acknowledges its join at `seq` in `epoch`. */
function accept(seq = 0, epoch = "E1") {
  const ws = FakeWebSocket.last;
  ws.open();
  const room = ws.params.get("room");
  if (room) ws.recv({ type: "joined", room, seq, epoch });
  return ws;
}

test("connects through dispatch, with the room, the JSON subprotocol and no since", async () => {
  const { c, clock, fetch, log } = make();
  c.connect();
  await clock.advance(0);
  assert.deepEqual(fetch.calls, ["http://dispatch.test:8081/v1/route?room=lobby"]);
  const ws = FakeWebSocket.last;
  assert.equal(ws.url, "ws://edge-1:8080/ws?room=lobby");
  assert.equal(ws.protocols, "roomcast.json.v1");
  accept(5);
  assert.equal(c.state, "connected");
  assert.deepEqual(log.states, ["connecting", "connected"]);
  ws.recv(batch("lobby", 6, 7));
  assert.deepEqual(log.messages.map((m) => m.seq), [6, 7]);
  c.disconnect();
  assert.equal(c.state, "disconnected");
  assert.equal(ws.closedByClient.code, 1000);
});

test("kinds have their own events; custom kinds through onKind", async () => {
  const { c, clock } = make();
  const got = { gift: [], chat: [], system: [], custom: [] };
  c.on("gift", (m) => got.gift.push(m.seq));
  c.on("chat", (m) => got.chat.push(m.seq));
  c.on("system", (m) => got.system.push(m.seq));
  c.onKind("sticker", (m) => got.custom.push(m.seq));
  c.connect();
  await clock.advance(0);
  const ws = accept();
  const m = (seq, kind) => ({ seq, ts_us: seq, kind, user: "u", body: null });
  ws.recv({ type: "batch", room: "lobby", messages: [m(1, "gift"), m(2, "chat"), m(3, "system"), m(4, "sticker")] });
  assert.deepEqual(got, { gift: [1], chat: [2], system: [3], custom: [4] });
});

test("a lost connection resumes with since and epoch; nothing reaches the app twice", async () => {
  const { c, clock, log } = make();
  c.connect();
  await clock.advance(0);
  let ws = accept(0, "E1");
  ws.recv(batch("lobby", 1, 2, 3));
  ws.serverClose(1006);
  assert.equal(c.state, "connecting");
  assert.equal(log.disconnected.length, 1);
  assert.equal(log.disconnected[0].reconnect, true);
  await clock.advance(log.disconnected[0].delayMs);
  ws = FakeWebSocket.last;
  assert.equal(ws.params.get("since"), "3");
  assert.equal(ws.params.get("epoch"), "E1");
  accept(5, "E1");
  assert.equal(log.joined[1].resumed, true);
  ws.recv(batch("lobby", 2, 3, 4, 5)); // the replay overlaps what was seen
  ws.recv(batch("lobby", 5, 6)); // and the live stream overlaps the replay
  assert.deepEqual(log.messages.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(log.messages.map((m) => m.recovered), [false, false, false, true, true, false]);
  assert.equal(c.stats.duplicatesDropped, 3);
});

test("gap and reset from the edge reach the app", async () => {
  const { c, clock, log } = make();
  c.connect();
  await clock.advance(0);
  let ws = accept(0, "E1");
  ws.recv(batch("lobby", 1));
  ws.serverClose(1006);
  await clock.advance(20_000);
  ws = FakeWebSocket.last;
  ws.open();
  ws.recv({ type: "gap", room: "lobby", from: 2, to: 9 });
  ws.recv({ type: "joined", room: "lobby", seq: 10, epoch: "E1" });
  ws.recv(batch("lobby", 10));
  assert.deepEqual(log.gaps, [{ room: "lobby", from: 2, to: 9 }]);
  ws.serverClose(1006);
  await clock.advance(20_000);
  ws = FakeWebSocket.last;
  assert.equal(ws.params.get("since"), "10");
  ws.open();
  ws.recv({ type: "reset", room: "lobby", epoch: "E2", seq: 0, reason: "epoch" });
  ws.recv({ type: "joined", room: "lobby", seq: 1, epoch: "E2" });
  ws.recv(batch("lobby", 1, 2));
  assert.equal(log.resets.length, 1);
  assert.equal(log.resets[0].previousEpoch, "E1");
  assert.equal(log.resets[0].previousSeq, 10);
  assert.deepEqual(log.messages.map((m) => `${m.epoch}:${m.seq}`), ["E1:1", "E1:10", "E2:1", "E2:2"]);
});

test("goaway: waits reconnect_after_ms (+ jitter), asks the goaway's dispatch for the current room, resumes", async () => {
  const { c, clock, fetch, log } = make({ fetch: routeTo((u) => (u.hostname === "edge-1" ? 2 : 1)) });
  c.connect();
  await clock.advance(0);
  let ws = accept(0, "E1");
  c.switch("stage"); // the goaway names the first room; the client is elsewhere now
  ws.recv({ type: "left", room: "lobby" });
  ws.recv({ type: "joined", room: "stage", seq: 7, epoch: "S1" });
  ws.recv(batch("stage", 8));
  ws.recv({ type: "goaway", url: "http://edge-1:8081/v1/route?room=lobby", reason: "edge draining", reconnect_after_ms: 700 });
  ws.serverClose(1001, "edge draining");
  assert.equal(log.goaways[0].target, "http://edge-1:8081/v1/route?room=stage");
  // random 0.5 x jitter 250 = 125: the next attempt at 825 ms, not before.
  await clock.advance(824);
  assert.equal(fetch.calls.length, 1, "not before reconnect_after_ms + jitter");
  await clock.advance(1);
  assert.deepEqual(fetch.calls, ["http://dispatch.test:8081/v1/route?room=lobby", "http://edge-1:8081/v1/route?room=stage"]);
  ws = FakeWebSocket.last;
  assert.equal(ws.url, "ws://edge-2:8080/ws?room=stage&since=8&epoch=S1");
  accept(8, "S1");
  assert.equal(c.state, "connected");
  // Used once: a later loss goes back to the configured dispatch.
  ws.serverClose(1006);
  await clock.advance(20_000);
  assert.equal(fetch.calls[2], "http://dispatch.test:8081/v1/route?room=stage");
});

test("goaway url without a room gets the room added", async () => {
  const { c, clock, fetch } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept();
  ws.recv({ type: "goaway", url: "http://edge-1:8081/v1/route", reason: "edge draining", reconnect_after_ms: 0 });
  ws.serverClose(1001);
  await clock.advance(1_000);
  assert.equal(fetch.calls[1], "http://edge-1:8081/v1/route?room=lobby");
});

test("goaway whose dispatch is gone falls back to the configured dispatch", async () => {
  const fetch = fakeFetch((url) =>
    url.startsWith("http://gone")
      ? Promise.reject(new TypeError("fetch failed"))
      : { status: 200, body: { url: "ws://edge-3:8080/ws?room=lobby", edge: "e3" } },
  );
  const { c, clock, log } = make({ fetch });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  ws.recv({ type: "goaway", url: "http://gone:8081/v1/route?room=lobby", reason: "edge draining", reconnect_after_ms: 0 });
  ws.serverClose(1001);
  await clock.advance(300);
  assert.equal(fetch.calls[1], "http://gone:8081/v1/route?room=lobby");
  assert.equal(log.errors.at(-1).source, "dispatch");
  await clock.advance(20_000);
  assert.equal(fetch.calls[2], "http://dispatch.test:8081/v1/route?room=lobby");
  assert.equal(FakeWebSocket.last.url, "ws://edge-3:8080/ws?room=lobby&since=0&epoch=E1");
});

test("goaway with an edge that never closes: the client leaves at the planned moment", async () => {
  const { c, clock } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept();
  ws.recv({ type: "goaway", url: "http://edge-1:8081/v1/route?room=lobby", reason: "edge draining", reconnect_after_ms: 100 });
  await clock.advance(225);
  assert.ok(ws.closedByClient, "old socket closed");
  assert.equal(FakeWebSocket.all.length, 2);
});

test("backoff grows over failed attempts and resets after a join", async () => {
  const fetch = fakeFetch(() => ({ status: 503, body: { error: "none" } }));
  const { c, clock } = make({ fetch, random: () => 0.99999999 });
  c.connect();
  const delays = [];
  for (let i = 0; i < 7; i++) {
    await clock.advance(0);
    delays.push(clock.nextDelay());
    await clock.advance(clock.nextDelay());
  }
  assert.deepEqual(
    delays.map((d) => Math.round(d / 10) * 10),
    [1000, 2000, 4000, 8000, 16000, 20000, 20000],
  );
  c.disconnect();
});

test("dispatch Retry-After is a floor", async () => {
  const fetch = fakeFetch(() => ({ status: 503, body: { error: "x" }, headers: { "Retry-After": "7" } }));
  const { c, clock } = make({ fetch, random: () => 0 });
  c.connect();
  await clock.advance(0);
  assert.equal(clock.nextDelay(), 7000);
  c.disconnect();
});

test("several dispatch endpoints and a fixed url are tried in turn", async () => {
  const fetch = fakeFetch(() => Promise.reject(new TypeError("fetch failed")));
  const { c, clock } = make({ fetch, dispatch: ["http://d1:1", "http://d2:2"], url: "ws://fixed:8080/ws" });
  c.connect();
  await clock.advance(0);
  await clock.advance(clock.nextDelay());
  assert.deepEqual(fetch.calls, ["http://d1:1/v1/route?room=lobby", "http://d2:2/v1/route?room=lobby"]);
  await clock.advance(clock.nextDelay());
  assert.equal(FakeWebSocket.last.url, "ws://fixed:8080/ws?room=lobby");
});

test("close codes: 4000 and 1013 reconnect with since at the normal pace", async () => {
  for (const code of [4000, 1013]) {
    FakeWebSocket.reset();
    const { c, clock, log } = make({ random: () => 0 });
    c.connect();
    await clock.advance(0);
    const ws = accept(0, "E");
    ws.recv(batch("lobby", 1, 2));
    ws.serverClose(code, "x");
    assert.equal(log.disconnected[0].delayMs, 500, `${code}`);
    assert.equal(log.errors.at(-1).closeCode, code);
    await clock.advance(500);
    assert.equal(FakeWebSocket.last.params.get("since"), "2", `${code}`);
    c.disconnect();
  }
});

test("close codes that blame the client never loop hot", async () => {
  for (const code of [1002, 1003, 1007, 1008, 1009]) {
    FakeWebSocket.reset();
    const { c, clock, log } = make({ random: () => 0 });
    c.connect();
    await clock.advance(0);
    for (let i = 0; i < 3; i++) {
      accept();
      FakeWebSocket.last.serverClose(code, "no");
      assert.ok(log.disconnected.at(-1).delayMs >= 20_000, `${code}: ${log.disconnected.at(-1).delayMs}`);
      await clock.advance(log.disconnected.at(-1).delayMs);
    }
    assert.equal(log.errors.at(-1).code, `close_${code}`);
    c.disconnect();
  }
});

test("4002: kicked by a moderator, the client stops and says so", async () => {
  const { c, clock, log } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "E");
  ws.recv(batch("lobby", 1));
  ws.recv({ type: "error", code: "kicked", message: "disconnected by a moderator" });
  ws.serverClose(4002, "kicked by a moderator");
  assert.equal(c.state, "disconnected");
  assert.deepEqual(log.disconnected.at(-1), { code: 4002, reason: "kicked by a moderator", reconnect: false, delayMs: undefined });
  assert.equal(log.errors.at(-1).code, "close_4002");
  const sockets = FakeWebSocket.all.length;
  await clock.advance(60_000);
  assert.equal(FakeWebSocket.all.length, sockets, "no reconnect on its own");
  c.connect();
  await clock.advance(0);
  assert.equal(FakeWebSocket.last.params.get("since"), "1", "the app may come back: positions kept");
});

test("banned from the room: dropped, not asked for again on reconnect", async () => {
  const { c, clock, log } = make({ random: () => 0 });
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "E");
  ws.recv({ type: "error", code: "banned", message: "banned from room lobby by a moderator for 60 s more" });
  ws.recv({ type: "left", room: "lobby" });
  assert.equal(c.room, undefined);
  assert.equal(log.errors.at(-1).code, "banned");
  ws.serverClose(1006);
  await clock.advance(clock.nextDelay());
  assert.equal(FakeWebSocket.last.params.get("room"), null, "the banned room is not joined again");
});

test("tombstones: deleted events name the message to remove; tombstones in place do not", async () => {
  const { c, clock, log } = make();
  const deleted = [];
  c.on("deleted", (d) => deleted.push([d.room, d.seq, d.tombstone.seq]));
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "E");
  const m = (seq, kind, body) => ({ seq, ts_us: seq, kind, user: "", body });
  ws.recv({ type: "batch", room: "lobby", messages: [m(1, "deleted", { seq: 1 }), m(2, "chat", "hi"), m(3, "deleted", { seq: 2 })] });
  assert.deepEqual(deleted, [["lobby", 2, 3]]);
  assert.deepEqual(log.messages.map((x) => x.seq), [1, 2, 3]);
});

test("4001: a new token is fetched before reconnecting", async () => {
  const asked = [];
  let n = 0;
  const { c, clock } = make({ token: async (ctx) => (asked.push(ctx.reason), `tok${++n}`) });
  c.connect();
  await clock.advance(0);
  assert.equal(FakeWebSocket.last.params.get("token"), "tok1");
  const ws = accept();
  ws.recv({ type: "error", code: "token_expired", message: "token expired" });
  ws.serverClose(4001, "token expired");
  await clock.advance(clock.nextDelay());
  assert.deepEqual(asked, ["connect", "reconnect"]);
  assert.equal(FakeWebSocket.last.params.get("token"), "tok2");
});

test("a refused upgrade (401 from ws, or unknown from a browser) asks for a new token", async () => {
  let n = 0;
  const { c, clock } = make({ token: () => `tok${++n}` });
  c.connect();
  await clock.advance(0);
  FakeWebSocket.last.fail("Unexpected server response: 401");
  await clock.advance(clock.nextDelay());
  assert.equal(FakeWebSocket.last.params.get("token"), "tok2");
  FakeWebSocket.last.fail("");
  await clock.advance(clock.nextDelay());
  assert.equal(FakeWebSocket.last.params.get("token"), "tok3");
  FakeWebSocket.last.fail("Unexpected server response: 503");
  await clock.advance(clock.nextDelay());
  assert.equal(FakeWebSocket.last.params.get("token"), "tok3", "a 503 is not the token's fault");
});

test("token refreshed before expiry with the refresh op", async () => {
  const clock = new FakeClock();
  const jwt = (expSec) =>
    ["e30", Buffer.from(JSON.stringify({ sub: "a", exp: expSec })).toString("base64url"), "sig"].join(".");
  const reasons = [];
  const { c } = make({
    scheduler: clock,
    livenessTimeoutMs: 10_000_000,
    token: (ctx) => (reasons.push(ctx.reason), jwt(Math.floor(clock.now() / 1000) + 600)),
  });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  await clock.advance(539_000);
  assert.deepEqual(reasons, ["connect"]);
  await clock.advance(1_000); // 60 s before exp
  assert.deepEqual(reasons, ["connect", "refresh"]);
  const op = ws.sent.find((m) => m.op === "refresh");
  assert.ok(op, "refresh op sent");
  const exp = Math.floor(clock.now() / 1000) + 600;
  ws.recv({ type: "refreshed", exp });
  await clock.advance(539_999);
  assert.deepEqual(reasons, ["connect", "refresh"]);
  await clock.advance(1);
  assert.deepEqual(reasons, ["connect", "refresh", "refresh"], "refreshed again before the new exp");
  c.disconnect();
});

test("liveness: a quiet connection is probed; a silent one is replaced within the bound", async () => {
  const { c, clock, log } = make({ livenessTimeoutMs: 9_000 });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  await clock.advance(5_999);
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 0);
  await clock.advance(1);
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 1, "probe at bound - window (3 s)");
  // An edge without a ping op answers bad_message: that is proof of life, not an app error.
  ws.recv({ type: "error", code: "bad_message", message: "invalid JSON envelope: unknown variant `ping`" });
  assert.equal(log.errors.length, 0);
  await clock.advance(8_999);
  assert.equal(c.state, "connected");
  assert.equal(FakeWebSocket.all.length, 1);
  // Now the network dies: no answer to the next probe.
  await clock.advance(9_000);
  assert.equal(c.stats.deadConnections, 1);
  assert.equal(log.errors.at(-1).code, "dead_connection");
  assert.ok(ws.closedByClient);
  assert.equal(c.state, "connecting");
  await clock.advance(2_000);
  assert.equal(FakeWebSocket.all.length, 2, "reconnected");
});

test("liveness: traffic keeps a connection alive without probes", async () => {
  const { c, clock } = make({ livenessTimeoutMs: 9_000 });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  for (let i = 1; i <= 10; i++) {
    await clock.advance(4_000);
    ws.recv(batch("lobby", i));
  }
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 0);
  assert.equal(c.state, "connected");
});

test("a connection that never opens is abandoned after connectTimeoutMs", async () => {
  const { c, clock } = make({ connectTimeoutMs: 3_000 });
  c.connect();
  await clock.advance(0);
  const ws = FakeWebSocket.last;
  await clock.advance(3_000);
  assert.ok(ws.closedByClient);
  assert.equal(c.state, "connecting");
  await clock.advance(2_000);
  assert.equal(FakeWebSocket.all.length, 2);
});

test("browser events: offline probes now, online reconnects now", async () => {
  const handlers = {};
  const target = {
    addEventListener: (t, fn) => (handlers[t] = fn),
    removeEventListener: (t) => delete handlers[t],
  };
  const doc = { visibilityState: "visible", ...target };
  const { c, clock } = make({ browserEvents: { window: target, document: doc }, livenessTimeoutMs: 30_000 });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  handlers.offline();
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 1, "probe at once");
  await clock.advance(5_000);
  assert.equal(c.stats.deadConnections, 1, "dead within the probe window");
  assert.equal(FakeWebSocket.all.length, 1);
  // Waiting for the backoff: `online` skips the wait.
  assert.ok(clock.nextDelay() > 0);
  handlers.online();
  await clock.advance(0);
  assert.equal(FakeWebSocket.all.length, 2);
  accept();
  c.disconnect();
  assert.deepEqual(Object.keys(handlers), [], "listeners removed");
});

test("publish over the socket: answered in order, refusals reject", async () => {
  const { c, clock } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept();
  const p1 = c.publish("chat", "hi");
  const p2 = c.publish("gift", { rose: 1 });
  assert.equal(ws.sent.filter((m) => m.op === "publish").length, 1, "one at a time");
  ws.recv({ type: "published", room: "lobby", seq: 1, ts_us: 10 });
  assert.deepEqual(await p1, { room: "lobby", seq: 1, ts_us: 10 });
  await settle();
  assert.equal(ws.sent.filter((m) => m.op === "publish").length, 2);
  ws.recv({ type: "error", code: "publish_forbidden", message: "kind gift may not be published by you" });
  await assert.rejects(p2, (e) => e.code === "publish_forbidden");
  c.disconnect();
  await assert.rejects(c.publish("chat", "x"), (e) => e.code === "not_connected");
});

test("switch while connected sends join with the position held for that room", async () => {
  const { c, clock } = make();
  const switches = [];
  c.on("switch", (s) => switches.push(s));
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "L");
  ws.recv(batch("lobby", 1, 2));
  c.switch("stage");
  assert.deepEqual(ws.sent.at(-1), { op: "join", room: "stage" });
  ws.recv({ type: "left", room: "lobby" });
  ws.recv(batch("lobby", 3)); // late message of the old room: not delivered
  ws.recv({ type: "joined", room: "stage", seq: 4, epoch: "S" });
  c.switch("lobby");
  assert.deepEqual(ws.sent.at(-1), { op: "join", room: "lobby", since: 2, epoch: "L" });
  assert.deepEqual(switches, [{ from: "lobby", to: "stage" }]);
  c.leave();
  assert.deepEqual(ws.sent.at(-1), { op: "leave" });
});

test("options are checked", () => {
  assert.throws(() => new RoomcastClient({ WebSocket: FakeWebSocket }), /dispatch/);
  assert.throws(() => new RoomcastClient({ url: "ws://x/ws", WebSocket: undefined }), /WebSocket/);
});

test("a page becoming visible probes the connection; hidden does nothing", async () => {
  const handlers = {};
  const doc = {
    visibilityState: "hidden",
    addEventListener: (t, fn) => (handlers[t] = fn),
    removeEventListener: (t) => delete handlers[t],
  };
  const { c, clock } = make({ browserEvents: { document: doc } });
  c.connect();
  await clock.advance(0);
  const ws = accept();
  handlers.visibilitychange();
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 0, "hidden: no probe");
  doc.visibilityState = "visible";
  handlers.visibilitychange();
  assert.equal(ws.sent.filter((m) => m.op === "ping").length, 1, "visible: probe at once");
  ws.recv({ type: "error", code: "bad_message", message: "unknown variant `ping`" });
  await clock.advance(10_000);
  assert.equal(c.stats.deadConnections, 0, "answered: alive");
  c.disconnect();
});

test("disconnect then connect resumes from the position kept", async () => {
  const { c, clock } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "E");
  ws.recv(batch("lobby", 1, 2));
  c.disconnect();
  assert.deepEqual(c.position("lobby"), { epoch: "E", seq: 2 });
  c.connect();
  await clock.advance(0);
  assert.equal(FakeWebSocket.last.params.get("since"), "2");
  assert.equal(FakeWebSocket.last.params.get("epoch"), "E");
});

test("online counts from joined and from batches (with or without messages) reach the app", async () => {
  const { c, clock } = make();
  const counts = [];
  c.on("online", (o) => counts.push([o.room, o.count]));
  c.connect();
  await clock.advance(0);
  const ws = FakeWebSocket.last;
  ws.open();
  ws.recv({ type: "joined", room: "lobby", seq: 0, epoch: "E1", online: 7 });
  ws.recv({ type: "batch", room: "lobby", messages: [], online: 9 });
  ws.recv(batch("lobby", 1, 1));
  ws.recv({ type: "batch", room: "other", messages: [], online: 99 });
  assert.deepEqual(counts, [["lobby", 7], ["lobby", 9]]);
  c.disconnect();
});

test("a fixed-URL client that followed a goaway keeps the edge dispatch gave it, not the drained one", async () => {
  const fetch = routeTo(() => 2);
  const { c, clock } = make({ dispatch: undefined, url: "ws://edge-1:8080/ws", fetch });
  c.connect();
  await clock.advance(0);
  let ws = FakeWebSocket.last;
  assert.equal(ws.url, "ws://edge-1:8080/ws?room=lobby");
  ws = accept(3, "E1");
  ws.recv({ type: "goaway", url: "http://edge-1:8081/v1/route?room=lobby", reason: "edge draining", reconnect_after_ms: 0 });
  ws.serverClose(1001);
  await clock.advance(1_000);
  ws = FakeWebSocket.last;
  assert.equal(ws.url, "ws://edge-2:8080/ws?room=lobby&since=3&epoch=E1");
  accept(3, "E1");
  // That edge is lost later: the client comes back to it, never to the drained one.
  FakeWebSocket.last.serverClose(1006);
  await clock.advance(20_000);
  assert.match(FakeWebSocket.last.url, /^ws:\/\/edge-2:8080\/ws\?room=lobby/);
});

test("a refused switch goes back to the room the edge kept the connection in", async () => {
  const { c, clock, log } = make();
  c.connect();
  await clock.advance(0);
  const ws = accept(4, "E1");
  ws.recv(batch("lobby", 5));
  c.switch("vip");
  ws.recv({ type: "error", code: "room_forbidden", message: "this room is not allowed by your token" });
  assert.equal(log.errors.at(-1).code, "room_forbidden");
  assert.equal(c.room, "lobby", "back in the room it is still in");
  assert.deepEqual(ws.sent.at(-1), { op: "join", room: "lobby", since: 5, epoch: "E1" });
  ws.recv({ type: "left", room: "lobby" });
  ws.recv({ type: "joined", room: "lobby", seq: 6, epoch: "E1" });
  ws.recv(batch("lobby", 6, 7));
  assert.deepEqual(log.messages.map((m) => m.seq), [5, 6, 7], "nothing dropped, nothing twice");
});

test("a token callback that returns no newer token is not asked in a hot loop", async () => {
  const exp = Math.floor(1_800_000_000_000 / 1000) + 10;
  const token = `x.${Buffer.from(JSON.stringify({ exp })).toString("base64url")}.y`;
  let asked = 0;
  const { c, clock } = make({ token: async () => (asked++, token) });
  c.connect();
  await clock.advance(0);
  const ws = accept(0, "E1");
  for (let i = 0; i < 100; i++) {
    await clock.advance(100);
    const last = ws.sent.at(-1);
    if (last?.op === "refresh" && !last.answered) {
      last.answered = true;
      ws.recv({ type: "refreshed", exp });
    }
  }
  assert.ok(asked <= 4, `asked ${asked} times in 10 s`);
  c.disconnect();
});

test("options no retry could fix are refused at construction", () => {
  assert.throws(() => make({ dispatch: "ws://127.0.0.1:8080/ws" }), /dispatch must be an http/);
  assert.throws(() => make({ dispatch: undefined, url: "not a url" }), /url must be a ws/);
  assert.throws(() => make({ room: "bad room!" }), /bad room name/);
  const { c } = make();
  assert.throws(() => c.switch(""), /bad room name/);
});
