// wss:// in real headless Chromium: the edge serves TLS itself (--tls-cert/--tls-key) with a
// certificate from a test CA made here (openssl); the demo page asks dispatch, is handed a
// wss:// URL, connects and receives every gift.
//
// How Chromium trusts the test certificate: `--ignore-certificate-errors-spki-list` with the
// base64 SHA-256 of the server key's SubjectPublicKeyInfo (pins that one key; no NSS database to
// set up). A browser launched without it refuses the same edge (checked first).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { serve } from "../../demo/serve.mjs";
import { CHROMIUM, launchBrowserWith, publishGift, startEdge, tempDir, waitFor } from "./harness.mjs";

/** A test CA and a server certificate for 127.0.0.1 signed by it (ECDSA P-256). */
function makeCerts() {
  const dir = tempDir("tls");
  const ssl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  ssl("req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=roomcast test CA");
  ssl("req", ...ec, "-keyout", "key.pem", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1");
  writeFileSync(join(dir, "ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  ssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem", "-days", "1", "-extfile", "ext.cnf");
  const leaf = new X509Certificate(readFileSync(join(dir, "cert.pem")));
  assert.ok(leaf.verify(new X509Certificate(readFileSync(join(dir, "ca.pem"))).publicKey), "leaf signed by the test CA");
  const spki = leaf.publicKey.export({ type: "spki", format: "der" });
  return { cert: join(dir, "cert.pem"), key: join(dir, "key.pem"), spkiHash: createHash("sha256").update(spki).digest("base64") };
}

test("Chromium opens wss:// to the edge (dispatch hands it out) and receives every gift", { timeout: 90_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM} (scripts/setup.sh installs Debian's chromium)`);
  const { cert, key, spkiHash } = makeCerts();
  const server = await serve(0, "127.0.0.1");
  const edge = await startEdge({ args: ["--tls-cert", cert, "--tls-key", key] });
  const { port } = server.address();
  const room = `tls-${process.pid}`;
  const pageUrl = `http://127.0.0.1:${port}/demo/?room=${room}&dispatch=http://${edge.http}`;

  // Without the pin, Chromium refuses the certificate: the page never joins.
  const untrusting = await launchBrowserWith(t, []);
  const refused = await untrusting.newPage();
  await refused.goto(pageUrl);
  // Chromium's alert (bad certificate) closes its connection: counted as tls_error.
  const tlsErrors = async () => {
    const text = await (await fetch(`http://${edge.http}/metrics`)).text();
    return text
      .split("\n")
      .filter((l) => l.startsWith("roomcast_connections_closed_total{") && l.includes('reason="tls_error"'))
      .reduce((sum, l) => sum + Number(l.split(" ").at(-1)), 0);
  };
  await waitFor(async () => (await tlsErrors()) >= 1, 20_000, "the untrusting browser's refusal (tls_error)");
  assert.equal(await refused.evaluate(() => window.roomcastDemo.joins.length), 0, "no join through an untrusted certificate");
  await untrusting.close();

  const browser = await launchBrowserWith(t, [`--ignore-certificate-errors-spki-list=${spkiHash}`], () => server.close());
  const page = await browser.newPage();
  const pageLog = [];
  page.on("console", (m) => pageLog.push(`${m.type()}: ${m.text()}`));
  const why = () => `\npage log:\n${pageLog.slice(-30).join("\n")}\nedge log:\n${edge.log.slice(-3000)}`;
  await page.goto(pageUrl);
  await waitFor(() => page.evaluate(() => window.roomcastDemo.joins.length >= 1), 20_000, "the page to join over wss", why);
  const edges = await page.evaluate(() => window.roomcastDemo.edges);
  assert.ok(edges.at(-1).startsWith("wss://127.0.0.1:"), `the page connected to ${edges.at(-1)}`);

  const published = [];
  for (let i = 1; i <= 30; i++) published.push(await publishGift(edge.http, room, { rose: i }));
  await waitFor(
    async () => (await page.evaluate(() => window.roomcastDemo.gifts.length)) >= published.length,
    20_000,
    "every gift over wss",
    why,
  );
  const got = await page.evaluate(() => window.roomcastDemo.gifts.map((g) => g.seq));
  assert.deepEqual(got, published, "every gift exactly once, in order");
});
