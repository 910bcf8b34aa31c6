// End-to-end harness: the real edge binary, a real redis-server of our own, helpers.
// Every process started here is ended by `cleanup()` (registered per test with `t.after`).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const PKG = resolve(fileURLToPath(new URL("../..", import.meta.url)));
export const REPO = resolve(PKG, "../..");
/** The edge binary: $ROOMCAST_EDGE_BIN, default target/debug/edge (what scripts/test.sh builds). */
export const EDGE_BIN = process.env.ROOMCAST_EDGE_BIN ?? join(REPO, "target/debug/edge");
/** Test output (screenshots): $ROOMCAST_E2E_OUT, default target/e2e. */
export const OUT_DIR = process.env.ROOMCAST_E2E_OUT ?? join(REPO, "target/e2e");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Debian's Chromium (scripts/setup.sh installs it), or $CHROMIUM_BIN. */
export const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";

/**
 * A headless Chromium (driven by playwright-core), closed after test `t`, then `closers` run,
 * then every process the harness started is ended.
 */
export async function launchBrowser(t, ...closers) {
  return launchBrowserWith(t, [], ...closers);
}

/** `launchBrowser` with extra Chromium flags (`extraArgs`). */
export async function launchBrowserWith(t, extraArgs, ...closers) {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", ...extraArgs],
  });
  t.after(async () => {
    await browser.close().catch(() => {});
    for (const close of closers) close();
    await cleanup();
  });
  return browser;
}

/** Polls `cond` until it returns truthy; throws with `what` (and `detail()`) after `ms`. */
export async function waitFor(cond, ms, what, detail = () => "") {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what} ${detail()}`);
    await sleep(50);
  }
}

/** A free TCP port on 127.0.0.1 (bound then released). */
export async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

export function tempDir(tag) {
  mkdirSync(join(tmpdir(), "roomcast-ts-e2e"), { recursive: true });
  return mkdtempSync(join(tmpdir(), "roomcast-ts-e2e", `${tag}-`));
}

const owned = new Set();

/** Ends every process this harness started (SIGKILL whatever is left) and removes temp dirs. */
export async function cleanup() {
  for (const p of [...owned]) await p.stop();
}

/** Starts our own redis-server on a free loopback port, no persistence. */
export async function startRedis() {
  const port = await freePort();
  const dir = tempDir("redis");
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  const r = {
    url: `redis://127.0.0.1:${port}`,
    child,
    async stop() {
      owned.delete(r);
      await killAndWait(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
  owned.add(r);
  await waitFor(() => redisPing(port), 10_000, `redis-server on ${port}`);
  return r;
}

function redisPing(port) {
  return new Promise((ok) => {
    const s = connect(port, "127.0.0.1");
    s.on("error", () => ok(false));
    s.on("connect", () => s.write("PING\r\n"));
    s.on("data", (d) => {
      s.destroy();
      ok(d.toString().startsWith("+PONG"));
    });
  });
}

/**
 * Starts an edge. `opts.bus`: a Redis URL (several edges); `opts.ws`/`opts.http`: fixed ports
 * (a restart on the same address), else free ones; `opts.config`: TOML text;
 * `opts.dataDir`: keep the store there (survives restarts), else `--no-store` in Redis mode and
 * a temp dir otherwise; `opts.env`: extra environment. Resolves once the edge prints its ready line.
 */
export async function startEdge(opts = {}) {
  const wsPort = opts.ws ?? (await freePort());
  const httpPort = opts.http ?? (await freePort());
  const dir = tempDir("edge");
  const args = [
    "--listen",
    `127.0.0.1:${wsPort}`,
    "--http",
    `127.0.0.1:${httpPort}`,
    "--shards",
    String(opts.shards ?? 1),
    "--merge-window-ms",
    String(opts.mergeWindowMs ?? 20),
    "--pin",
    "false",
  ];
  if (opts.bus) args.push("--bus", opts.bus, "--advertise", `ws://127.0.0.1:${wsPort}/ws`);
  if (opts.dataDir) args.push("--data-dir", opts.dataDir);
  else if (opts.bus) args.push("--no-store");
  else args.push("--data-dir", join(dir, "data"));
  if (opts.config) {
    const cfg = join(dir, "edge.toml");
    writeFileSync(cfg, opts.config);
    args.push("--config", cfg);
  }
  args.push(...(opts.args ?? []));
  const child = spawn(EDGE_BIN, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn", ...(opts.env ?? {}) },
  });
  let log = "";
  child.stderr.on("data", (d) => {
    log += d;
    if (log.length > 200_000) log = log.slice(-100_000);
    if (process.env.ROOMCAST_E2E_VERBOSE) process.stderr.write(d);
  });
  const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
  const ready = new Promise((ok, fail) => {
    let buf = "";
    child.stdout.on("data", (d) => {
      buf += d;
      const m = /roomcast edge ready ws=(\S+) http=(\S+)/.exec(buf);
      if (m) ok({ ws: m[1], http: m[2] });
    });
    exited.then(({ code, signal }) => fail(new Error(`edge exited before ready (${code ?? signal}):\n${log}`)));
  });
  const e = {
    child,
    wsPort,
    httpPort,
    get log() {
      return log;
    },
    exited,
    sigterm: () => child.kill("SIGTERM"),
    kill9: () => child.kill("SIGKILL"),
    async stop() {
      owned.delete(e);
      // SIGINT: close every connection at once (SIGTERM would drain for seconds).
      await killAndWait(child, "SIGINT");
      rmSync(dir, { recursive: true, force: true });
    },
  };
  owned.add(e);
  let timer;
  const timeout = new Promise((_, fail) => {
    timer = setTimeout(() => fail(new Error(`edge not ready in 20 s:\n${log}`)), 20_000);
  });
  const addr = await Promise.race([ready, timeout]).finally(() => clearTimeout(timer));
  e.ws = addr.ws;
  e.http = addr.http;
  return e;
}

async function killAndWait(child, signal = "SIGTERM") {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const done = new Promise((r) => child.once("exit", r));
  child.kill(signal);
  const t = setTimeout(() => child.kill("SIGKILL"), 5_000);
  await done;
  clearTimeout(t);
}

/**
 * Publishes a gift through the HTTP API; retries while the edge says to (429, 503); resolves
 * to its seq (and epoch-free: the caller knows the room's epoch from clients).
 */
export async function publishGift(http, room, body, { tries = 50 } = {}) {
  let last;
  for (let i = 0; i < tries; i++) {
    try {
      const res = await fetch(`http://${http}/v1/rooms/${encodeURIComponent(room)}/messages`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ kind: "gift", user: "e2e", body }),
      });
      const text = await res.text();
      if (res.status === 200) return JSON.parse(text).seq;
      last = `HTTP ${res.status} ${text}`;
      if (res.status !== 429 && res.status !== 503) throw new Error(`publish to ${room}: ${last}`);
    } catch (e) {
      if (String(e.message).startsWith("publish to")) throw e;
      last = String(e);
    }
    await sleep(100);
  }
  throw new Error(`publish to ${room} gave up: ${last}`);
}

/** GET /v1/route on an edge: the ws URL it hands out for `room`, or null on 503. */
export async function route(http, room) {
  const res = await fetch(`http://${http}/v1/route?room=${encodeURIComponent(room)}`);
  if (!res.ok) return null;
  return (await res.json()).url;
}

/** An HS256 connection token from `edge token` (signed with `secret`). */
export async function edgeToken(secret, sub, ttl) {
  const { execFile } = await import("node:child_process");
  return new Promise((ok, fail) =>
    execFile(EDGE_BIN, ["token", "--sub", sub, "--ttl", ttl], { env: { ...process.env, ROOMCAST_AUTH_SECRET: secret } }, (e, out) =>
      e ? fail(e) : ok(out.trim()),
    ),
  );
}
