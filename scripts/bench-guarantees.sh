#!/usr/bin/env bash
# Delivery guarantees under a chat flood (issue: delivery guarantees): one room of 10^4 members,
# 2,000 chat/s and 20 gifts/s offered, one member in ten reading slowly (4 KiB per 0.5 s, 16 KiB
# receive buffer). The edge runs its defaults (window 100 ms, adaptive merging and sampling; the
# durable store on, fsync "always", in a fresh data dir), plus EDGE_ARGS.
# Requirement: every gift offered admitted, no gift lost; gift latency p99 (full-speed readers)
# within the 10 s promise.
#
# The edge and the load generator are built from a git worktree snapshot of HEAD ($WT, made if
# missing and removed at the end unless KEEP_WT=1; an existing one is moved to HEAD), so the
# figures belong to one commit. Before the run it waits for a quiet box: no cargo, rustc, test
# binary or debug edge running and a 1-minute load average under LOAD_MAX (at most WAIT_QUIET
# minutes, then it runs anyway and says so in the note and box.txt).
#
# Gifts and chat are published by GIFT_STREAMS and CHAT_STREAMS threads (each one request in
# flight, its share of the rate): with the store on, a gift is acknowledged only once fsynced, so
# one stream could not offer more than 1 / (fsync + round trip) gifts a second.
#
# Results: bench-results/<date>-$SCENARIO/ (loadgen's files, the edge's refusal and shedding
# metrics, its adaptive-window log, box.txt).
# Env: CONNS (10000), CHAT (2000), GIFT (20), SECS (20), EDGE_ARGS (""; e.g. --no-store),
# SCENARIO (guarantees-10k), GIFT_STREAMS (16), CHAT_STREAMS (4), WORKERS (0: loadgen's default),
# WT (${TMPDIR:-/tmp}/roomcast-bench-guarantees), CARGO_TARGET_DIR
# ($ROOT/target/bench), EDGE_BIN + LG_BIN (prebuilt binaries: no snapshot, the commit is HEAD's),
# KEEP_WT (0), WAIT_QUIET (20),
# LOAD_MAX (1.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CONNS=${CONNS:-10000}
CHAT=${CHAT:-2000}
GIFT=${GIFT:-20}
SECS=${SECS:-20}
EDGE_ARGS=${EDGE_ARGS:-}
SCENARIO=${SCENARIO:-guarantees-10k}
GIFT_STREAMS=${GIFT_STREAMS:-16}
CHAT_STREAMS=${CHAT_STREAMS:-4}
WORKERS=${WORKERS:-0}
WT=${WT:-${TMPDIR:-/tmp}/roomcast-bench-guarantees}
KEEP_WT=${KEEP_WT:-0}
WAIT_QUIET=${WAIT_QUIET:-20}
LOAD_MAX=${LOAD_MAX:-1.0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench}

# shellcheck source=lib/bench.sh
. "$ROOT/scripts/lib/bench.sh"
snapshot_build

BOX=$(wait_quiet)
echo "$BOX"

ports_free 18771 18772
TMP=$(mktemp -d)
# shellcheck disable=SC2086 # EDGE_ARGS is a list of flags
"$EDGE" --data-dir "$TMP/data" --shards 2 --listen 127.0.0.1:18771 --http 127.0.0.1:18772 $EDGE_ARGS >"$TMP/edge.log" 2>&1 &
EPID=$!
cleanup() {
  kill -INT "$EPID" 2>/dev/null || true
  sleep 1
  rm -rf "$TMP"
  snapshot_remove
}
trap cleanup EXIT
edge_up "$EPID" 127.0.0.1:18772 "$TMP/edge.log"
"$LG" run --target edge --ws 127.0.0.1:18771 --http 127.0.0.1:18772 \
  --connections "$CONNS" --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$CHAT" --slow-every 10 \
  --gift-streams "$GIFT_STREAMS" --chat-streams "$CHAT_STREAMS" --workers "$WORKERS" \
  --server-pid "$EPID" --out "$ROOT/bench-results" --scenario "$SCENARIO" --replace \
  --note "edge $COMMIT --shards 2 ${EDGE_ARGS:-(store on, fsync always)} (defaults: window 100 ms, adaptive, visible chat 50/s, room_deliveries_per_s 500000, SO_SNDBUF 16 KiB); one reader in ten reads 4 KiB per 0.5 s; $BOX"
OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-$SCENARIO"
echo "$BOX" >"$OUT/box.txt"
curl -s 127.0.0.1:18772/metrics |
  grep -E "^roomcast_(messages_dropped|shed_bytes|slow_consumer|publish_rejected|hot_room|chat_sampling|messages_in|store_bytes|connections_closed)" \
    >"$OUT/edge-metrics.txt" || true
grep -E "adaptive merge window|latency controller|health changed" "$TMP/edge.log" | sed -E "s/\x1b\[[0-9;]*m//g" | tail -30 >"$OUT/edge-adaptive.log" || true
sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge.log" | grep -vE "adaptive merge window|latency controller" | head -n 100 >"$OUT/edge.log" || true
echo "results in $OUT"
