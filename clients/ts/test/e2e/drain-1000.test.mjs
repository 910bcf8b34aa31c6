// 1,000 TS clients (Node, the `ws` package) in one room on two edges sharing a Redis; one edge
// is drained (SIGTERM) while gifts are published through the HTTP API: every client ends with
// every gift exactly once, and the drained edge's clients moved through dispatch.
import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { RoomcastClient } from "../../dist/index.js";
import { cleanup, publishGift, sleep, startEdge, startRedis, waitFor } from "./harness.mjs";

const N = Number(process.env.ROOMCAST_E2E_CLIENTS ?? 1000);
const DRAIN = "[drain]\nperiod_ms = 2000\ndeadline_ms = 15000\n";

test(`${N} TS clients through a drain: no gift lost or duplicated`, { timeout: 180_000 }, async (t) => {
  const clients = [];
  t.after(async () => {
    for (const c of clients) c.client.disconnect();
    await cleanup();
  });
  const redis = await startRedis();
  const edges = [await startEdge({ bus: redis.url, config: DRAIN }), await startEdge({ bus: redis.url, config: DRAIN })];
  const room = `drain-${process.pid}`;
  // Dispatch spreads clients only once both edges' load reports are in Redis.
  await waitFor(
    async () => {
      const seen = new Set();
      for (let i = 0; i < 20; i++) {
        const r = await fetch(`http://${edges[0].http}/v1/route?room=${room}`);
        if (r.ok) seen.add((await r.json()).url);
      }
      return seen.size === 2;
    },
    10_000,
    "dispatch to know both edges",
  );

  // Connect in waves (a real audience arrives over seconds, and this box has two cores).
  for (let i = 0; i < N; i++) {
    const c = {
      client: new RoomcastClient({
        dispatch: edges.map((e) => `http://${e.http}`),
        room,
        WebSocket,
        minReconnectDelayMs: 200,
        maxReconnectDelayMs: 3_000,
        browserEvents: false,
      }),
      gifts: [],
      joined: 0,
      goaways: 0,
      goawayUrl: undefined,
      urls: [],
      errors: [],
    };
    c.client.on("gift", (m) => c.gifts.push(m.seq));
    c.client.on("joined", () => c.joined++);
    c.client.on("goaway", (g) => {
      c.goaways++;
      c.goawayUrl = g.url;
    });
    c.client.on("connected", (x) => c.urls.push(x.url));
    c.client.on("error", (e) => c.errors.push(`${e.source}:${e.code}`));
    c.client.connect();
    clients.push(c);
    if (i % 100 === 99) await sleep(100);
  }
  await waitFor(() => clients.every((c) => c.joined >= 1), 60_000, `${N} clients to join`, () =>
    `(${clients.filter((c) => c.joined >= 1).length} joined)`,
  );
  const onEdge = (c, i) => c.urls.at(-1).includes(`:${edges[i].wsPort}/`);
  const counts = [0, 1].map((i) => clients.filter((c) => onEdge(c, i)).length);
  t.diagnostic(`clients per edge before the drain: ${counts.join(", ")}`);
  const drained = counts[0] >= counts[1] ? 0 : 1;
  const survivor = edges[1 - drained];
  assert.ok(counts[drained] >= N / 10, `dispatch spread the clients (${counts})`);
  const movers = clients.filter((c) => onEdge(c, drained));

  const published = [];
  const pub = async (n, gapMs = 0) => {
    for (let i = 0; i < n; i++) {
      published.push(await publishGift(survivor.http, room, { n: published.length + 1 }));
      if (gapMs) await sleep(gapMs);
    }
  };
  await pub(5);
  edges[drained].sigterm();
  // Gifts all through the drain (period 2 s, then the edge's last clients leave).
  await pub(40, 75);
  const exit = await edges[drained].exited;
  assert.equal(exit.code, 0, "the drained edge exits 0");
  await pub(5);

  const complete = (c) => c.gifts.length >= published.length;
  await waitFor(() => clients.every(complete), 60_000, "every client to have every gift", () =>
    `(${clients.filter(complete).length}/${N} complete)`,
  );
  const want = JSON.stringify(published);
  let lost = 0;
  let dup = 0;
  for (const c of clients) {
    const seen = new Set(c.gifts);
    dup += c.gifts.length - seen.size;
    lost += published.filter((s) => !seen.has(s)).length;
  }
  assert.equal(dup, 0, "no duplicate reached any app");
  assert.equal(lost, 0, "no gift lost");
  for (const c of clients) assert.equal(JSON.stringify(c.gifts), want, "every client: every gift once, in order");
  const moved = movers.filter((c) => c.goaways >= 1 && onEdge(c, 1 - drained)).length;
  assert.equal(moved, movers.length, `every client of the drained edge moved (${moved}/${movers.length})`);
  const dropped = clients.reduce((n, c) => n + c.client.stats.duplicatesDropped, 0);
  t.diagnostic(`goaway url as the edge sent it: ${movers[0].goawayUrl}`);
  t.diagnostic(
    `${N} clients, ${published.length} gifts, ${movers.length} moved off the drained edge, ` +
      `${dropped} duplicates dropped by the clients, errors: ${[...new Set(clients.flatMap((c) => c.errors))].join(" ") || "none"}`,
  );
});
