// The SSE fallback transport with the browser's own EventSource in headless Chromium, against
// real edges on a real Redis: the page receives gifts; its edge is killed (SIGKILL) and gifts
// are published through the other edge meanwhile; the edge comes back on its address and the
// browser reconnects on its own with Last-Event-ID and gets exactly the gifts it missed. The
// page deduplicates nothing, so a gift lost or repeated at the seam fails the test.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { serve } from "../../demo/serve.mjs";
import { CHROMIUM, launchBrowser, publishGift, startEdge, startRedis, waitFor } from "./harness.mjs";


test("EventSource in Chromium: gifts, edge killed and restarted, Last-Event-ID resumes exactly the missed gifts", { timeout: 90_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/setup.sh installs Debian's chromium)`);
  const server = await serve(0, "127.0.0.1");
  const browser = await launchBrowser(t, () => server.close());
  const redis = await startRedis();
  const edges = [await startEdge({ bus: redis.url }), await startEdge({ bus: redis.url })];
  const room = `sse-${process.pid}`;
  const page = await browser.newPage();
  const pageLog = [];
  page.on("console", (m) => pageLog.push(`${m.type()}: ${m.text()}`));
  const lastEventIds = [];
  // Every header the browser sent (allHeaders: the network stack's, Last-Event-ID included).
  page.on("request", async (r) => {
    if (!r.url().includes("/sse?")) return;
    const id = (await r.allHeaders().catch(() => ({})))["last-event-id"];
    lastEventIds.push(id ?? null);
  });
  const { port } = server.address();
  // Served from its own origin: the stream is cross-origin (CORS on /sse).
  const sseUrl = `http://${edges[0].ws}/sse?room=${room}`;
  await page.goto(`http://127.0.0.1:${port}/test/e2e/sse-page.html?sse=${encodeURIComponent(sseUrl)}`);
  const state = () => page.evaluate(() => JSON.parse(JSON.stringify(window.sse)));
  const why = () => `\npage log:\n${pageLog.slice(-20).join("\n")}\nrequests' Last-Event-ID: ${JSON.stringify(lastEventIds)}`;
  await waitFor(async () => (await state()).types.includes("joined"), 15_000, "the page to join", why);

  const published = [];
  for (let i = 0; i < 5; i++) published.push(await publishGift(edges[1].http, room, { rose: i + 1 }));
  await waitFor(async () => (await state()).gifts.length >= 5, 10_000, "5 gifts on the page", why);
  let s = await state();
  assert.deepEqual(s.gifts, published);
  const epoch = s.epochs[0];
  assert.equal(s.ids.at(-1), `${epoch}:${published.at(-1)}`, "batches carry EPOCH:SEQ ids");

  // The page's edge dies; gifts go on through the other one while it is away.
  edges[0].kill9();
  await edges[0].exited;
  for (let i = 0; i < 3; i++) published.push(await publishGift(edges[1].http, room, { rose: 10 + i }));
  edges[0] = await startEdge({ bus: redis.url, ws: edges[0].wsPort, http: edges[0].httpPort });
  await waitFor(async () => (await state()).gifts.length >= published.length, 30_000, "the gifts missed while cut off", why);
  // And live again after the seam.
  published.push(await publishGift(edges[1].http, room, { rose: 20 }));
  await waitFor(async () => (await state()).gifts.length >= published.length, 10_000, "a live gift after the resume", why);
  s = await state();
  assert.deepEqual(s.gifts, published, "every gift exactly once, in order, across the restart");
  assert.ok(s.opens >= 2, `the browser reconnected on its own (opens ${s.opens})`);
  assert.equal(s.ids.at(-1), `${epoch}:${published.at(-1)}`);
  assert.ok(
    lastEventIds.includes(`${epoch}:${published[4]}`),
    `the reconnect sent Last-Event-ID ${epoch}:${published[4]}${why()}`,
  );
  t.diagnostic(`gifts ${s.gifts.length}, opens ${s.opens}, errors ${s.errors}`);
});
