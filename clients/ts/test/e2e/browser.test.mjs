// The demo page in real headless Chromium against real edges on a real Redis:
// receives gifts; its edge drained (SIGTERM): moves and ends with every gift exactly once; its
// edge killed and restarted: reconnects and recovers what was published meanwhile. Writes a
// screenshot to target/e2e/demo.png.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { serve } from "../../demo/serve.mjs";
import { CHROMIUM, OUT_DIR, launchBrowser, publishGift, sleep, startEdge, startRedis, waitFor } from "./harness.mjs";

const DRAIN = "[drain]\nperiod_ms = 1500\ndeadline_ms = 10000\n";

/** The demo's static server and a headless Chromium, both closed (with the edges) after the test. */
async function demoServerAndBrowser(t) {
  const server = await serve(0, "127.0.0.1");
  const browser = await launchBrowser(t, () => server.close());
  return { server, browser };
}

test("demo page in Chromium: gifts, drain to the other edge, restart, every gift exactly once", { timeout: 120_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/setup.sh installs Debian's chromium)`);
  const { server, browser } = await demoServerAndBrowser(t);

  const redis = await startRedis();
  let edges = [await startEdge({ bus: redis.url, config: DRAIN }), await startEdge({ bus: redis.url, config: DRAIN })];
  const room = `show-${process.pid}`;
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  const pageLog = [];
  page.on("console", (m) => pageLog.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => pageLog.push(`pageerror: ${e.message}`));
  const dispatch = edges.map((e) => `http://${e.http}`).join(",");
  const { port } = server.address();
  // The page is served from its own origin: dispatch is cross-origin (CORS on /v1/route).
  await page.goto(`http://127.0.0.1:${port}/demo/?room=${room}&dispatch=${dispatch}&min_delay_ms=300&max_delay_ms=3000`);

  const demo = () =>
    page.evaluate(() => {
      const d = window.roomcastDemo;
      return {
        state: d.state,
        gifts: d.gifts.map((g) => g.seq),
        recovered: d.gifts.filter((g) => g.recovered).map((g) => g.seq),
        epochs: [...new Set(d.gifts.map((g) => g.epoch))],
        notices: d.notices.map((n) => n.kind),
        errors: d.errors,
        edges: d.edges,
        joins: d.joins.length,
        stats: { ...d.client.stats },
        banner: document.getElementById("banner-text").textContent,
        stateText: document.getElementById("state").textContent,
        giftCount: document.getElementById("gift-count").textContent,
        online: document.getElementById("online").textContent,
      };
    });
  const why = () => `\npage log:\n${pageLog.slice(-30).join("\n")}`;
  await waitFor(async () => (await demo()).joins >= 1, 15_000, "the page to join", why);
  let d = await demo();
  assert.equal(d.stateText, "connected");
  assert.equal(d.online, "1", "the page shows the room's online count (its own member)");
  // Chromium offers permessage-deflate by default and the edge accepts it: the gifts below
  // reach the page as compressed frames (one compression per batch, shared by every member).
  const negotiated = await Promise.all(
    edges.map(async (e) => {
      const text = await (await fetch(`http://${e.http}/metrics`)).text();
      const line = text.split("\n").find((l) => l.startsWith("roomcast_ws_deflate_connections_total "));
      return line ? Number(line.split(" ")[1]) : 0;
    }),
  );
  assert.ok(negotiated[0] + negotiated[1] >= 1, `the page negotiated permessage-deflate (${negotiated})`);

  // 1. Gifts arrive and show.
  const published = [];
  const pub = async (via, n) => {
    for (let i = 0; i < n; i++) published.push(await publishGift(via.http, room, { rose: published.length + 1 }));
  };
  await pub(edges[0], 5);
  await waitFor(async () => (await demo()).gifts.length >= 5, 10_000, "5 gifts on the page", why);
  d = await demo();
  assert.deepEqual(d.gifts, published);
  assert.match(d.banner, /e2e sent rose ×5/);
  assert.equal(d.giftCount, "5");
  // A chat typed into the page goes out over the socket and comes back to the room.
  await page.fill("#say-text", "hello from chromium");
  await page.click("#say button");
  await waitFor(
    () => page.evaluate(() => window.roomcastDemo.chats.some((c) => c.body === "hello from chromium")),
    10_000,
    "the page's own chat",
    why,
  );

  // 2. Drain the page's edge (SIGTERM) while gifts are published through the other one.
  const onEdge = (url) => edges.findIndex((e) => url.includes(`:${e.wsPort}/`));
  const current = d.edges.at(-1);
  const drained = onEdge(current);
  assert.ok(drained >= 0, `the page's edge ${current} is one of ours`);
  const other = edges[1 - drained];
  edges[drained].sigterm();
  const pubDuring = (async () => {
    for (let i = 0; i < 20; i++) {
      await pub(other, 1);
      await sleep(100);
    }
  })();
  const exit = await edges[drained].exited;
  await pubDuring;
  assert.equal(exit.code, 0, "the drained edge exits 0");
  await waitFor(async () => (await demo()).gifts.length >= published.length, 20_000, "every gift after the drain", why);
  d = await demo();
  assert.deepEqual(d.gifts, published, "every gift exactly once, in order, after the drain");
  assert.ok(d.stats.goaways >= 1, "the page got a goaway");
  assert.ok(d.notices.includes("goaway"), "and showed it");
  assert.equal(onEdge(d.edges.at(-1)) === drained, false, "the page moved to the other edge");
  assert.equal(d.state, "connected");

  // 3. Restart: the drained edge comes back on its address; the page's edge is killed
  // (SIGKILL, a crash) and restarted; gifts published meanwhile are recovered with since.
  edges[drained] = await startEdge({ bus: redis.url, config: DRAIN, ws: edges[drained].wsPort, http: edges[drained].httpPort });
  const survivor = edges[drained];
  const connectsBefore = d.stats.connects;
  const crashed = 1 - drained;
  edges[crashed].kill9();
  await edges[crashed].exited;
  const outage = published.length;
  await pub(survivor, 5);
  edges[crashed] = await startEdge({ bus: redis.url, config: DRAIN, ws: edges[crashed].wsPort, http: edges[crashed].httpPort });
  await pub(edges[crashed], 3);
  await waitFor(async () => (await demo()).gifts.length >= published.length, 20_000, "every gift after the restart", why);
  d = await demo();
  assert.deepEqual(d.gifts, published, "every gift exactly once across drain and restart");
  assert.ok(d.stats.connects > connectsBefore, "the page reconnected");
  const missed = published.slice(outage, outage + 5);
  assert.ok(
    missed.some((s) => d.recovered.includes(s)),
    `gifts published while the page was cut off came back as recovered (recovered ${d.recovered}, missed ${missed})`,
  );
  assert.equal(d.epochs.length, 1, "one numbering throughout");
  assert.equal(d.stateText, "connected");

  mkdirSync(OUT_DIR, { recursive: true });
  const shot = join(OUT_DIR, "demo.png");
  await page.screenshot({ path: shot, fullPage: true });
  assert.ok(existsSync(shot));
  t.diagnostic(`screenshot: ${shot}; gifts ${d.gifts.length}, recovered ${d.recovered.length}, edges ${d.edges.join(" -> ")}`);
});

test("demo page in Chromium: offline is detected within the probe window, online reconnects at once and recovers", { timeout: 60_000 }, async (t) => {
  const { server, browser } = await demoServerAndBrowser(t);
  // The single-node default (embedded store), no Redis.
  const edge = await startEdge({});
  const room = `net-${process.pid}`;
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const { port } = server.address();
  // Liveness bound 6 s (probe window 2 s); retries at least 3 s apart, so a reconnect within a
  // second of coming back online can only be the `online` handler's doing.
  await page.goto(
    `http://127.0.0.1:${port}/demo/?room=${room}&dispatch=http://${edge.http}&liveness_ms=6000&min_delay_ms=3000&max_delay_ms=10000`,
  );
  const demo = () =>
    page.evaluate(() => {
      const d = window.roomcastDemo;
      return { state: d.state, gifts: d.gifts.map((g) => [g.seq, g.recovered]), errors: d.errors.map((e) => e.code), stats: { ...d.client.stats } };
    });
  await waitFor(async () => (await demo()).state === "connected", 15_000, "the page to connect");
  const first = await publishGift(edge.http, room, { rose: 1 });
  await waitFor(async () => (await demo()).gifts.length === 1, 10_000, "the first gift");

  await ctx.setOffline(true);
  const offAt = Date.now();
  const second = await publishGift(edge.http, room, { rose: 2 });
  await waitFor(async () => (await demo()).stats.deadConnections === 1, 4_000, "the dead connection to be noticed");
  const noticedMs = Date.now() - offAt;
  let d = await demo();
  assert.ok(d.errors.includes("dead_connection"));
  assert.equal(d.state, "connecting");
  await sleep(3_500); // offline: attempts fail (dispatch unreachable)
  d = await demo();
  assert.equal(d.stats.connects, 1, "no connection while offline");

  await ctx.setOffline(false);
  const onAt = Date.now();
  await waitFor(async () => (await demo()).state === "connected", 2_500, "reconnect right after `online`");
  const backMs = Date.now() - onAt;
  await waitFor(async () => (await demo()).gifts.length === 2, 5_000, "the gift published while offline");
  d = await demo();
  assert.deepEqual(d.gifts, [
    [first, false],
    [second, true],
  ]);
  t.diagnostic(`offline noticed in ${noticedMs} ms, reconnected ${backMs} ms after online`);
});
