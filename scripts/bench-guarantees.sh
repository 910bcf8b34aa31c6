#!/usr/bin/env bash
# Delivery guarantees under a chat flood (issue: delivery guarantees): one room of 10^4 members,
# 2,000 chat/s and 20 gifts/s offered, one member in ten reading slowly (4 KiB per 0.5 s, 16 KiB
# receive buffer). The edge runs its defaults (window 100 ms, adaptive merging and sampling).
# Requirement: no gift lost; gift latency p99 (full-speed readers) within the 10 s promise.
# Results: bench-results/<date>-guarantees-10k/.  Env: CONNS (10000), CHAT (2000), GIFT (20), SECS (20).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-10000}
CHAT=${CHAT:-2000}
GIFT=${GIFT:-20}
SECS=${SECS:-20}
cargo build -q --release -p edge -p loadgen
TMP=$(mktemp -d)
"$ROOT/target/release/edge" --data-dir "$TMP/data" --shards 2 --listen 127.0.0.1:18771 --http 127.0.0.1:18772 >"$TMP/edge.log" 2>&1 &
EPID=$!
trap 'kill -INT $EPID 2>/dev/null || true; sleep 1; rm -rf $TMP' EXIT
for _ in $(seq 50); do curl -sf 127.0.0.1:18772/healthz >/dev/null && break; sleep 0.2; done
"$ROOT/target/release/loadgen" run --target edge --ws 127.0.0.1:18771 --http 127.0.0.1:18772 \
  --connections "$CONNS" --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$CHAT" --slow-every 10 \
  --server-pid "$EPID" --out "$ROOT/bench-results" --scenario guarantees-10k \
  --note "edge --shards 2 (defaults: window 100 ms, adaptive, visible chat 50/s, room_deliveries_per_s 500000, SO_SNDBUF 16 KiB); one reader in ten reads 4 KiB per 0.5 s"
OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-guarantees-10k"
curl -s 127.0.0.1:18772/metrics | grep -E "^roomcast_(messages_dropped|shed_bytes|slow_consumer|publish_rejected|hot_window|sampling)" >"$OUT/edge-metrics.txt" || true
grep -E "adaptive merge window|health changed" "$TMP/edge.log" | sed -E "s/\x1b\[[0-9;]*m//g" | tail -30 >"$OUT/edge-adaptive.log" || true
echo "results in $OUT"
