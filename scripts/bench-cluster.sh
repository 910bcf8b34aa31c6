#!/usr/bin/env bash
# The bus past one Redis (issue #16): 3 edges on this machine sharing ROOMS rooms through one
# Redis (with a replica) or a Redis Cluster of 3 primaries and 3 replicas, 3 x PER_EDGE
# connections, gifts and chat flowing. Reports deliveries/s, publish p99 (the HTTP round trip
# the publisher sees) and gift delivery p99, with and without waiting for a replica
# (bus.min_replicas_acked), and optionally a primary's failover mid-run: the primary that owns
# room r0's slot is SIGKILLed, its replica takes over, the old one comes back as a replica; the
# time from the kill to the new owner, to the first gift delivered again in an affected room,
# and gifts lost (must be 0) go into failover.json. Results: bench-results/<date>-$SCEN/.
# Every node runs as ARCHITECTURE.md asks (appendonly yes, appendfsync always).
# Env: MODE (cluster | single), ACK (0 | 1: bus.min_replicas_acked), FAILOVER (seconds into
# publishing to kill r0's primary, cluster only; 0: none), PER_EDGE (15000), ROOMS (1000),
# GIFT (per room per s, 0.5), CHAT (per room per s, 2), SECS (40), SHARDS (2 per edge),
# SCEN (cluster-$MODE-ack$ACK, with -failover), EDGE_BIN / LG_BIN (prebuilt binaries; by
# default built here in release).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${MODE:-cluster}
ACK=${ACK:-0}
FAILOVER=${FAILOVER:-0}
PER_EDGE=${PER_EDGE:-15000}
ROOMS=${ROOMS:-1000}
GIFT=${GIFT:-0.5}
CHAT=${CHAT:-2}
SECS=${SECS:-40}
SHARDS=${SHARDS:-2}
SUFFIX=""
[ "$FAILOVER" != 0 ] && SUFFIX="-failover"
SCEN=${SCEN:-cluster-$MODE-ack$ACK$SUFFIX}
case "$MODE" in cluster | single) ;; *) echo "MODE must be cluster or single" >&2; exit 2 ;; esac
if [ "$FAILOVER" != 0 ] && [ "$MODE" != cluster ]; then echo "FAILOVER needs MODE=cluster" >&2; exit 2; fi
if [ -z "${EDGE_BIN:-}" ] || [ -z "${LG_BIN:-}" ]; then
  cargo build -q --release -p edge -p loadgen
fi
EDGE_BIN=${EDGE_BIN:-$ROOT/target/release/edge}
LG_BIN=${LG_BIN:-$ROOT/target/release/loadgen}
TMP=$(mktemp -d)
PIDS=()
declare -A NODE_PID
cleanup() {
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${NODE_PID[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  sleep 1
  rm -rf "$TMP"
}
trap cleanup EXIT

# One redis-server on $1, its files in its own directory; extra arguments follow.
start_node() {
  local port=$1
  shift
  mkdir -p "$TMP/r$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
    --dir "$TMP/r$port" "$@" >>"$TMP/r$port/log" 2>&1 &
  NODE_PID[$port]=$!
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis-server on $port did not start" >&2
  exit 1
}
cluster_args() { echo --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1500; }

PORTS=(18831 18832 18833 18834 18835 18836)
if [ "$MODE" = cluster ]; then
  for p in "${PORTS[@]}"; do
    # shellcheck disable=SC2046
    start_node "$p" $(cluster_args)
  done
  redis-cli --cluster create $(for p in "${PORTS[@]}"; do printf '127.0.0.1:%s ' "$p"; done) \
    --cluster-replicas 1 --cluster-yes >"$TMP/create.log"
  for _ in $(seq 200); do
    ok=1
    for p in "${PORTS[@]}"; do
      redis-cli -p "$p" cluster info | grep -q "cluster_state:ok" || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  BUS="redis-cluster://127.0.0.1:18831,127.0.0.1:18832"
else
  start_node 18831
  start_node 18832 --replicaof 127.0.0.1 18831
  BUS="redis://127.0.0.1:18831"
fi
# Replicas in sync before the edges start (WAIT counts only replicas that are online).
for _ in $(seq 200); do
  [ "$(redis-cli -p 18831 info replication | tr -d '\r' | grep -c 'state=online')" -ge 1 ] && break
  sleep 0.1
done
[ "$ACK" != 0 ] && for p in "${!NODE_PID[@]}"; do redis-cli -p "$p" config set min-replicas-to-write "$ACK" >/dev/null; done

cat >"$TMP/edge.toml" <<TOML
shards = $SHARDS
[bus]
url = "$BUS"
min_replicas_acked = $ACK
[ws]
backlog = 16384
[limits]
room_rate = 5000.0
room_burst = 10000.0
TOML
for i in 1 2 3; do
  "$EDGE_BIN" --config "$TMP/edge.toml" --listen 127.0.0.1:1884$i --http 127.0.0.1:1885$i \
    --advertise ws://127.0.0.1:1884$i/ws >"$TMP/edge$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do
    [ "$(curl -s 127.0.0.1:1885$i/metrics | awk '/^roomcast_bus_up / {print $2}')" = 1 ] && break
    sleep 0.2
  done
done

OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-$SCEN"
rm -rf "$OUT"
mkdir -p "$OUT"
"$LG_BIN" run --target edge --ws 127.0.0.1:18841,127.0.0.1:18842,127.0.0.1:18843 \
  --http 127.0.0.1:18851 --connections $((PER_EDGE * 3)) --rooms "$ROOMS" --dist uniform --ramp 10000 \
  --src-addrs 16 --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$CHAT" --gift-streams 8 --chat-streams 8 \
  --out "$TMP/lg" --scenario "$SCEN" \
  --note "3 edges (--shards $SHARDS) on $MODE redis (appendfsync always), bus.min_replicas_acked = $ACK; failover at ${FAILOVER}s (0: none)" \
  | tee "$TMP/loadgen.log" &
LG=$!
if [ "$FAILOVER" != 0 ]; then
  while ! grep -qE "^t=\s*${FAILOVER}\." "$TMP/loadgen.log" 2>/dev/null; do sleep 0.2; done
  SLOT=$(redis-cli -p 18831 cluster keyslot r0)
  owner() {
    local p=$1
    redis-cli -p "$p" cluster nodes 2>/dev/null | awk -v s="$SLOT" '$3 ~ /master/ && $3 !~ /fail/ {
      for (i = 9; i <= NF; i++) { n = split($i, r, "-"); lo = r[1]; hi = (n > 1) ? r[2] : r[1];
        if (s + 0 >= lo + 0 && s + 0 <= hi + 0) { split($2, a, "@"); split(a[1], h, ":"); print h[2] } } }'
  }
  OLD=$(owner 18831)
  ALIVE=18831
  [ "$OLD" = 18831 ] && ALIVE=18832
  T_KILL=$(date +%s.%N)
  kill -9 "${NODE_PID[$OLD]}"
  echo "failover: killed primary $OLD (slot $SLOT, room r0) at $(date +%T.%N)"
  NEW=""
  while :; do
    NEW=$(owner "$ALIVE" | head -1)
    [ -n "$NEW" ] && [ "$NEW" != "$OLD" ] && break
    sleep 0.05
  done
  T_NEW=$(date +%s.%N)
  echo "failover: $NEW owns slot $SLOT after $(awk -v a="$T_NEW" -v b="$T_KILL" 'BEGIN { printf "%.0f", (a - b) * 1000 }') ms"
  # The old primary comes back as the new one's replica (with ACK=1 the new primary needs one
  # to acknowledge gifts).
  # shellcheck disable=SC2046
  start_node "$OLD" $(cluster_args)
  T_BACK=$(date +%s.%N)
  printf '{"killed_port": %s, "slot": %s, "new_owner_port": %s, "kill_unix_s": %s, "new_owner_unix_s": %s, "old_back_unix_s": %s}\n' \
    "$OLD" "$SLOT" "$NEW" "$T_KILL" "$T_NEW" "$T_BACK" >"$OUT/failover-times.json"
fi
wait "$LG"
cp -r "$TMP"/lg/*-"$SCEN"/. "$OUT/"
cp "$TMP/loadgen.log" "$OUT/loadgen.log"
for i in 1 2 3; do
  sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge$i.log" | grep -E "WARN|ERROR|moved|failover|lost" | head -200 >"$OUT/edge$i-warnings.log" || true
done
python3 - "$OUT" "$MODE" "$ACK" "$FAILOVER" <<'PY'
import json, os, sys
out, mode, ack, failover = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = json.load(open(f"{out}/result.json"))
s = {
    "mode": mode, "min_replicas_acked": ack, "connections": r["connections"],
    "failed_connections": r["failed_connections"], "rooms": r["rooms"],
    "publish_offered_per_s": r["publish_offered_per_s"],
    "deliveries_per_s": round(r["deliveries_per_s"]),
    "publish_ack_ms_p50_p99_max": {k: [v["p50"], v["p99"], v["max"]] for k, v in r["publish_ack_ms"].items()},
    "gift_latency_ms_p50_p99_max": [r["latency_ms"]["gift"][k] for k in ("p50", "p99", "max")],
    "chat_latency_ms_p50_p99": [r["latency_ms"]["chat"][k] for k in ("p50", "p99")],
    "gift_lost": r["lost"]["gift"], "gift_duplicates": r["duplicates"]["gift"],
    "gift_gave_up": r["publish_gave_up"].get("gift", 0),
    "publish_refused_by_status": r["publish_refused_by_status"],
    "edge_task_clock_us_per_delivery": r.get("edge_shards_task_clock_us_per_delivery"),
}
f = f"{out}/failover-times.json"
if os.path.exists(f):
    t = json.load(open(f))
    s["failover"] = {
        "kill_to_new_owner_ms": round((t["new_owner_unix_s"] - t["kill_unix_s"]) * 1000),
        "killed_port": t["killed_port"], "slot": t["slot"],
        "gift_p99_ms_max_of_seconds": max((x["gift_p99_ms"] for x in r["samples"]), default=None),
    }
json.dump(s, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(s, indent=2))
PY
echo "results in $OUT"
