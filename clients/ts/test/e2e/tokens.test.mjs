// Tokens against the real edge: a refused token is replaced, a token is refreshed in place with
// the `refresh` op before it expires, and a connection closed at expiry (4001) comes back with a
// new token and recovers what was published meanwhile.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { RoomcastClient } from "../../dist/index.js";
import { cleanup, edgeToken, publishGift, sleep, startEdge, waitFor } from "./harness.mjs";

const SECRET = "roomcast-ts-e2e-secret-0123456789abcdef";

function watch(client) {
  const w = { gifts: [], errors: [], refreshed: 0, joined: [], closes: [], asked: [] };
  client.on("gift", (m) => w.gifts.push(m.seq));
  client.on("error", (e) => w.errors.push(e.code));
  client.on("refreshed", () => w.refreshed++);
  client.on("joined", (j) => w.joined.push(j));
  client.on("disconnected", (d) => w.closes.push(d.code));
  return w;
}

test("tokens: refused token replaced, refresh before expiry, 4001 then a new token and recovery", { timeout: 60_000 }, async (t) => {
  t.after(cleanup);
  const edge = await startEdge({ env: { ROOMCAST_AUTH_SECRET: SECRET } });
  const room = `tok-${process.pid}`;
  const base = { url: `ws://${edge.ws}/ws`, room, WebSocket, browserEvents: false, minReconnectDelayMs: 200, maxReconnectDelayMs: 1_000 };

  // A: its first token is forged (401 before the upgrade); later ones live 6 s and are refreshed.
  const asksA = [];
  const a = new RoomcastClient({
    ...base,
    refreshBeforeMs: 3_000,
    token: async (ctx) => {
      asksA.push(ctx.reason);
      return asksA.length === 1 ? "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.Zm9yZ2Vk" : edgeToken(SECRET, "alice", "6s");
    },
  });
  // B: its token lives 3 s and it cannot refresh; after 4001 it gets a long one.
  const asksB = [];
  const b = new RoomcastClient({
    ...base,
    token: async (ctx) => {
      asksB.push(ctx.reason);
      if (ctx.reason === "refresh") throw new Error("no refresh for B");
      return edgeToken(SECRET, "bob", asksB.length === 1 ? "3s" : "60s");
    },
  });
  t.after(() => {
    a.disconnect();
    b.disconnect();
  });
  const wa = watch(a);
  const wb = watch(b);
  a.connect();
  b.connect();
  await waitFor(() => wa.joined.length >= 1 && wb.joined.length >= 1, 10_000, "both to join", () => JSON.stringify({ wa, wb }));
  assert.ok(wa.errors.includes("http_401"), `A's forged token was refused with 401 (${wa.errors})`);
  assert.deepEqual(asksA.slice(0, 2), ["connect", "reconnect"]);

  const published = [];
  const end = Date.now() + 12_000;
  while (Date.now() < end) {
    published.push(await publishGift(edge.http, room, { n: published.length + 1 }));
    await sleep(250);
  }
  await waitFor(() => wa.gifts.length >= published.length && wb.gifts.length >= published.length, 10_000, "every gift", () =>
    JSON.stringify({ a: wa.gifts.length, b: wb.gifts.length, want: published.length, bcloses: wb.closes }),
  );
  // A stayed on one connection the whole time, its token refreshed in place (6 s tokens, 12 s).
  assert.ok(wa.refreshed >= 2, `A refreshed ${wa.refreshed} times`);
  assert.ok(asksA.filter((r) => r === "refresh").length >= 2);
  assert.equal(a.stats.connects, 1, "A never reconnected");
  assert.deepEqual(wa.gifts, published);
  // B was closed at expiry with 4001, came back with a new token and recovered.
  assert.ok(wb.closes.includes(4001), `B was closed with 4001 (${wb.closes})`);
  assert.ok(asksB.includes("reconnect"), `B asked for a new token (${asksB})`);
  assert.ok(wb.joined.length >= 2 && wb.joined.at(-1).resumed, "B resumed with since");
  assert.deepEqual(wb.gifts, published, "B: every gift once, across the 4001");

  // A chat over the socket is answered with its seq.
  const p = await a.publish("chat", "hello");
  assert.equal(p.room, room);
  assert.ok(p.seq > published.at(-1));
});
