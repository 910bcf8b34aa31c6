#!/usr/bin/env bash
# Side-by-side: the same workload against the roomcast edge and Nchan (nginx pub/sub), in one
# run, on loopback. Each server gets one core for fan-out (edge --shards 1, nginx 1 worker).
# Writes bench-results/<date>-peers/{README.md,summary.json} and one loadgen folder per run.
#
# Env: CONNS (10000), SECS (10), GIFT (5), CHAT (15), HEAVY_CHAT (200).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-peers.sh
ROOT=$PWD
CONNS=${CONNS:-10000}
SECS=${SECS:-10}
GIFT=${GIFT:-5}
CHAT=${CHAT:-15}
HEAVY_CHAT=${HEAVY_CHAT:-200}
DATE=$(date +%Y-%m-%d)
OUT=$ROOT/bench-results
SUM=$OUT/$DATE-peers
mkdir -p "$SUM"
cargo build -q --release -p edge -p loadgen
LG=$ROOT/target/release/loadgen
EDGE=$ROOT/target/release/edge
TMP=$(mktemp -d)
cleanup() {
  [[ -f $TMP/nginx.pid ]] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
  pkill -f "$EDGE --listen 127.0.0.1:1870" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

run_edge() { # name window chat
  local name=$1 window=$2 chat=$3
  # Same deliveries as Nchan: the edge's demand sampling (which would cut chat to 50/s here) is
  # set out of reach, so both servers deliver every message and CPU per delivery compares like
  # with like.
  printf '[adaptive]\nroom_deliveries_per_s = 1e12\n' >"$TMP/edge.toml"
  "$EDGE" --listen 127.0.0.1:18701 --http 127.0.0.1:18702 --data-dir "$TMP/data-$window" --shards 1 --merge-window-ms "$window" \
    --max-queue-bytes 16777216 --config "$TMP/edge.toml" >"$TMP/edge.log" 2>&1 &
  local pid=$!
  sleep 1
  "$LG" run --target edge --ws 127.0.0.1:18701 --http 127.0.0.1:18702 --connections "$CONNS" \
    --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$chat" --server-pid "$pid" --out "$OUT" \
    --scenario "peers-$name" --replace --note "edge --shards 1 --merge-window-ms $window, demand sampling off" | tail -n 3
  kill -INT $pid; wait $pid || true
}

run_nchan() { # name chat
  local name=$1 chat=$2
  sed -e "s#@PORT@#18801#" -e "s#@PREFIX@#$TMP#" scripts/nchan/nginx.conf.in >"$TMP/nginx.conf"
  nginx -c "$TMP/nginx.conf" -p "$TMP" -e "$TMP/error.log" &
  sleep 1
  local master worker
  master=$(cat "$TMP/nginx.pid")
  worker=$(pgrep -P "$master" | head -1)
  "$LG" run --target nchan --ws 127.0.0.1:18801 --http 127.0.0.1:18801 --connections "$CONNS" \
    --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$chat" --server-pid "$worker" --out "$OUT" \
    --scenario "peers-$name" --replace --note "nginx $(nginx -v 2>&1 | cut -d/ -f2) + libnginx-mod-nchan, 1 worker" | tail -n 3
  kill "$master"; sleep 1
}

run_edge edge-w100 100 "$CHAT"
run_edge edge-w0 0 "$CHAT"
run_nchan nchan "$CHAT"
run_edge edge-heavy-w100 100 "$HEAVY_CHAT"
run_nchan nchan-heavy "$HEAVY_CHAT"

python3 - "$OUT" "$DATE" "$SUM" "$CONNS" "$SECS" "$GIFT" "$CHAT" "$HEAVY_CHAT" <<'PY'
import json, sys, os
out, date, summ, conns, secs, gift, chat, heavy = sys.argv[1:]
runs = {}
for name in ["edge-w100", "edge-w0", "nchan", "edge-heavy-w100", "nchan-heavy"]:
    p = os.path.join(out, f"{date}-peers-{name}", "result.json")
    if os.path.exists(p):
        runs[name] = json.load(open(p))
def cpu(n): return runs.get(n, {}).get("edge_cpu_us_per_delivery")
rows = []
for n, r in runs.items():
    rows.append("| %s | %d | %d / %d | %.0f | %s | %s / %s | %.1f / %.1f | %s |" % (
        n, r["connections"], r["published"]["gift"], r["published"]["chat"], r["deliveries_per_s"],
        "%.3f" % r["edge_cpu_us_per_delivery"] if r["edge_cpu_us_per_delivery"] else "-",
        r["lost"]["gift"], r["lost"]["chat"],
        r["latency_ms"]["gift"]["p50"], r["latency_ms"]["gift"]["p99"],
        "yes" if r["generator_saturated"] else "no"))
ratio = lambda a, b: (cpu(b) / cpu(a)) if cpu(a) and cpu(b) else None
summary = {"conns": int(conns), "secs": int(secs), "gift_rate": float(gift), "chat_rate": float(chat),
           "heavy_chat_rate": float(heavy),
           "cpu_ratio_nchan_over_edge_w100": ratio("edge-w100", "nchan"),
           "cpu_ratio_nchan_over_edge_w0": ratio("edge-w0", "nchan"),
           "cpu_ratio_heavy": ratio("edge-heavy-w100", "nchan-heavy"),
           "runs": {n: {k: r[k] for k in ["connections", "published", "deliveries", "deliveries_per_s", "lost", "duplicates", "latency_ms", "edge_cpu_us_per_delivery", "edge_rss_bytes_per_connection", "generator_saturated"]} for n, r in runs.items()}}
json.dump(summary, open(os.path.join(summ, "summary.json"), "w"), indent=2)
fmt = lambda v: "%.1fx" % v if v else "n/a"
open(os.path.join(summ, "README.md"), "w").write(f"""# roomcast edge vs Nchan, {date}

- Command: `CONNS={conns} SECS={secs} GIFT={gift} CHAT={chat} HEAVY_CHAT={heavy} scripts/bench-peers.sh`
- Machine: {os.cpu_count()} vCPUs, loopback; each server has one core for fan-out (edge `--shards 1`,
  nginx 1 worker); the load generator runs on the same machine.
- Workload: {conns} connections in one room; gifts {gift}/s and chat {chat}/s published over HTTP
  (heavy: chat {heavy}/s); {secs} s. Server CPU (user + system) from /proc over the publishing window.

| run | connections | published gift / chat | deliveries/s | server CPU µs per delivery | lost gift / chat | gift p50 / p99 ms | generator saturated |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

CPU per delivery, Nchan / edge: default window {fmt(summary['cpu_ratio_nchan_over_edge_w100'])},
window 0 {fmt(summary['cpu_ratio_nchan_over_edge_w0'])}, heavy chat {fmt(summary['cpu_ratio_heavy'])}.
Per-run folders: {date}-peers-*/ (result.json, README.md, plots).

The publisher is paced but synchronous: when a server answers publishes slowly it publishes
less than the target rate (see "published"); CPU per *delivered* message is the comparable
figure either way. Loss is counted per kind from per-(room, kind) counters in the bodies.
""")
print(open(os.path.join(summ, "README.md")).read())
PY
