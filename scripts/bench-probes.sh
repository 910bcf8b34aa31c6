#!/usr/bin/env bash
# Cost of the kernel probes (issue: kernel probes).
#  1. One look at the kernel with the eBPF source and with the sock_diag fallback while an edge
#     holds 10^3, 10^4 and 10^5 connections, and one Prometheus scrape of the edge's /metrics.
#     The load generator runs in its own network namespace behind a veth pair (NETNS=1, the
#     default), so the edge's namespace holds the edge's sockets only, as on a production box;
#     NETNS=0 keeps everything on loopback (the walk then also visits the clients' sockets).
#  2. The edge's CPU per delivered message with the probes off and on (default 1 s interval),
#     same load, alternating runs.
# Needs root (ip netns). Results: bench-results/<date>-probes/.
# Env: SIZES ("1000 10000 100000"), ROUNDS (30), DELIVERY_CONNS (10000), DELIVERY_SECS (20),
# REPEAT (2), NETNS (1), SKIP_DELIVERY (unset).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZES=${SIZES:-"1000 10000 100000"}
ROUNDS=${ROUNDS:-30}
DELIVERY_CONNS=${DELIVERY_CONNS:-10000}
DELIVERY_SECS=${DELIVERY_SECS:-20}
REPEAT=${REPEAT:-2}
NETNS=${NETNS:-1}
OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-probes"
mkdir -p "$OUT"
cargo build -q --release -p edge -p loadgen
cargo build -q --release -p roomcast-ebpf --example probe_bench
TMP=$(mktemp -d)
EPID=
if [ "$NETNS" = 1 ]; then
  NS=rcbench
  ip netns del $NS 2>/dev/null || true
  ip netns add $NS
  ip link add rcb-e type veth peer name rcb-l
  ip link set rcb-l netns $NS
  ip addr add 10.77.0.1/24 dev rcb-e
  ip link set rcb-e up
  ip netns exec $NS ip link set lo up
  for i in $(seq 2 140); do ip netns exec $NS ip addr add 10.77.0.$i/24 dev rcb-l; done
  ip netns exec $NS ip link set rcb-l up
  HOST=10.77.0.1
  LG=(ip netns exec $NS "$ROOT/target/release/loadgen")
  SRC=(--src-net 10.77.0 --src-addrs 16)
else
  HOST=127.0.0.1
  LG=("$ROOT/target/release/loadgen")
  SRC=(--src-addrs 16)
fi
cleanup() {
  [ -n "$EPID" ] && kill -INT "$EPID" 2>/dev/null || true
  pkill -TERM -f "loadgen worker" 2>/dev/null || true
  sleep 1
  [ "$NETNS" = 1 ] && ip netns del rcbench 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

start_edge() { # $1: probes.source
  cat >"$TMP/edge.toml" <<TOML
shards = 6
[ws]
backlog = 16384
[probes]
source = "$1"
[ingest]
# The API listens on the bench's private veth address (not loopback) and takes no keys here.
insecure_no_keys = true
TOML
  "$ROOT/target/release/edge" --data-dir "$TMP/data" --config "$TMP/edge.toml" --listen $HOST:18721 --http $HOST:18722 >"$TMP/edge.log" 2>&1 &
  EPID=$!
  for _ in $(seq 50); do curl -sf $HOST:18722/healthz >/dev/null && return; sleep 0.2; done
  echo "edge did not start"; cat "$TMP/edge.log"; exit 1
}
stop_edge() { kill -INT "$EPID" 2>/dev/null || true; wait "$EPID" 2>/dev/null || true; EPID=; sleep 2; }

: >"$OUT/scrape.jsonl"
for n in $SIZES; do
  start_edge auto
  # Hold n connections long enough to measure; 1 gift/s keeps them honest.
  secs=$(( n / 5000 + 40 ))
  "${LG[@]}" run --target edge --ws $HOST:18721 --http $HOST:18722 --connections "$n" --ramp 10000 \
    "${SRC[@]}" --duration "$secs" --gift-rate 1 --chat-rate 0 --out "$TMP" --scenario "hold-$n" \
    >"$TMP/loadgen-$n.log" 2>&1 &
  LPID=$!
  "$ROOT/target/release/examples/probe_bench" --port 18721 --expect "$n" --rounds "$ROUNDS" | tee -a "$OUT/scrape.jsonl"
  # What a Prometheus scrape of the edge costs (it reads the probe thread's last look).
  python3 - "$n" "$HOST" <<'PY' | tee -a "$OUT/scrape.jsonl"
import json, sys, time, urllib.request
ts = []
for _ in range(30):
    t = time.perf_counter(); body = urllib.request.urlopen(f"http://{sys.argv[2]}:18722/metrics").read(); ts.append((time.perf_counter() - t) * 1e3)
ts.sort()
print(json.dumps({"source": "edge /metrics", "connections": int(sys.argv[1]), "bytes": len(body), "wall_ms_p50": ts[15], "wall_ms_max": ts[-1]}))
PY
  # (a script's background jobs ignore SIGINT: TERM, and the workers too)
  kill -TERM "$LPID" 2>/dev/null || true; wait "$LPID" 2>/dev/null || true
  pkill -TERM -f "loadgen worker" 2>/dev/null || true
  stop_edge
done

: >"$OUT/delivery.jsonl"
[ -n "${SKIP_DELIVERY:-}" ] && exit 0
for r in $(seq "$REPEAT"); do
  for src in off auto; do
    start_edge "$src"
    "${LG[@]}" run --target edge --ws $HOST:18721 --http $HOST:18722 --connections "$DELIVERY_CONNS" \
      --ramp 10000 "${SRC[@]}" --duration "$DELIVERY_SECS" --gift-rate 10 --chat-rate 30 \
      --server-pid "$EPID" --out "$TMP" --scenario "delivery-$src-$r" \
      >"$TMP/loadgen-delivery.log" 2>&1 || { cat "$TMP/loadgen-delivery.log"; exit 1; }
    res=$(ls -d "$TMP"/*-delivery-$src-$r)/result.json
    python3 - "$res" "$src" "$r" <<'PY' | tee -a "$OUT/delivery.jsonl"
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"probes": sys.argv[2], "run": int(sys.argv[3]),
                  "edge_cpu_us_per_delivery": r.get("edge_cpu_us_per_delivery"),
                  "deliveries": r.get("deliveries"), "gift_p99_ms": r["latency_ms"]["gift"]["p99"]}))
PY
    stop_edge
  done
done
echo "results in $OUT"
