// A tiny static file server for the demo: serves clients/ts/ (so /demo/ can import /dist/).
//   node demo/serve.mjs [PORT] [HOST]   then open http://HOST:PORT/demo/?dispatch=...&room=...
// Also imported by the end-to-end tests (`serve(port, host)` resolves to the listening server).
import { createServer } from "node:http";
import { readFile, stat } from "node:fs/promises";
import { extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(fileURLToPath(new URL("..", import.meta.url)));
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json",
  ".json": "application/json",
  ".png": "image/png",
  ".svg": "image/svg+xml",
};

export function serve(port = 0, host = "127.0.0.1") {
  const server = createServer(async (req, res) => {
    try {
      const path = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname);
      let file = normalize(join(ROOT, path));
      if (file !== ROOT && !file.startsWith(ROOT + sep)) {
        res.writeHead(403).end();
        return;
      }
      if ((await stat(file)).isDirectory()) {
        if (!path.endsWith("/")) {
          // /demo -> /demo/, so that the page's relative imports resolve.
          res.writeHead(301, { location: `${path}/${new URL(req.url ?? "/", "http://x").search}` }).end();
          return;
        }
        file = join(file, "index.html");
      }
      if (file.includes(`${sep}node_modules${sep}`)) {
        res.writeHead(404).end();
        return;
      }
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
    }
  });
  return new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(port, host, () => ok(server));
  });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const server = await serve(Number(process.argv[2] ?? 8000), process.argv[3] ?? "127.0.0.1");
  const a = server.address();
  console.log(`serving ${ROOT} on http://${a.address}:${a.port}/demo/`);
}
