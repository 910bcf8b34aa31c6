// The edge's built-in dashboard (/dashboard) in real headless Chromium against a loaded edge:
// 40 members (WebSockets opened by a second page) and gifts published throughout. The charts
// (uPlot, served from the binary) must have data: connections, deliveries per second, gift
// latency; the hottest-rooms table must name the room. Writes target/e2e/dashboard.png (the
// picture in docs/ is one of these).
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { CHROMIUM, OUT_DIR, launchBrowser, publishGift, sleep, startEdge, waitFor } from "./harness.mjs";


test("dashboard in Chromium: the charts fill with a loaded edge's figures", { timeout: 90_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/setup.sh installs Debian's chromium)`);
  const browser = await launchBrowser(t);
  const edge = await startEdge({ shards: 2, mergeWindowMs: 50 });
  const room = `dash-${process.pid}`;

  // Members: a page that opens 40 WebSockets to the room and counts what they receive.
  const members = await browser.newPage();
  await members.goto(`http://${edge.http}/livez`);
  await members.evaluate(
    ({ ws, room }) => {
      window.received = 0;
      window.sockets = [];
      for (let i = 0; i < 40; i++) {
        const s = new WebSocket(`ws://${ws}/ws?room=${room}`);
        s.onmessage = () => window.received++;
        window.sockets.push(s);
      }
    },
    { ws: edge.ws, room },
  );
  await waitFor(async () => (await members.evaluate(() => window.received)) >= 40, 10_000, "40 members joined");

  const page = await browser.newPage({ viewport: { width: 1400, height: 1500 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`http://${edge.http}/dashboard`);

  // Gifts for six seconds while the page samples once a second.
  const until = Date.now() + 6_000;
  for (let n = 0; Date.now() < until; n++) {
    await publishGift(edge.http, room, { n });
    await sleep(40);
  }
  await sleep(1_500);

  const seen = await page.evaluate(() => {
    const last = (id, i) => {
      const d = window.__charts[id].data[i];
      return d.filter((v) => v != null);
    };
    return {
      points: window.__charts.c_conns.data[0].length,
      conns: last("c_conns", 1),
      deliveries: last("c_rates", 2),
      messagesIn: last("c_rates", 1),
      giftP99: last("c_lat", 2),
      // The per-kind chart: one line per kind, made at the first read.
      kindGiftP99: (() => {
        const c = window.__charts.c_kinds;
        const i = c ? c.series.findIndex((s) => s.label === "gift p99") : -1;
        return i > 0 ? last("c_kinds", i) : [];
      })(),
      status: document.getElementById("status").textContent,
      rooms: document.getElementById("rooms").textContent,
      canvases: document.querySelectorAll(".uplot canvas").length,
    };
  });
  mkdirSync(OUT_DIR, { recursive: true });
  await page.screenshot({ path: join(OUT_DIR, "dashboard.png"), fullPage: true });

  assert.deepEqual(errors, [], "no script errors on the page");
  assert.ok(seen.canvases >= 8, `eight charts drawn: ${JSON.stringify(seen)}`);
  assert.ok(seen.points >= 3, `a point a second: ${JSON.stringify(seen)}`);
  assert.ok(Math.max(...seen.conns) >= 40, `40 members: ${JSON.stringify(seen)}`);
  assert.ok(Math.max(...seen.messagesIn) > 0, `messages in per second: ${JSON.stringify(seen)}`);
  assert.ok(Math.max(...seen.deliveries) > 0, `deliveries per second: ${JSON.stringify(seen)}`);
  assert.ok(seen.giftP99.length > 0 && Math.max(...seen.giftP99) > 0, `gift latency: ${JSON.stringify(seen)}`);
  assert.ok(seen.kindGiftP99.length > 0 && Math.max(...seen.kindGiftP99) > 0, `gift latency by kind: ${JSON.stringify(seen)}`);
  assert.match(seen.rooms, new RegExp(room), "the hottest rooms name the loaded room");
  assert.match(seen.status, /ok|degraded|overloaded/);
});
