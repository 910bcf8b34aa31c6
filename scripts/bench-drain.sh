#!/usr/bin/env bash
# Drain under load (issue: several edges): Redis, 3 edges and a stand-alone dispatch on this
# machine, 3 x 15,000 connections spread over ROOMS rooms; gifts and chat flow; one edge is
# drained mid-run. Its clients get goaway, ask dispatch, reconnect to the others with `since`.
# Reports: time to empty the edge, reconnect rate, gift loss and duplicates (must be 0), gift
# p99 latency per second during the drain. Results: bench-results/<date>-$SCEN/.
# Every 0.5 s it also samples the online count of room r0 as edges 1 and 3 report it (the
# cluster-wide total and per-edge breakdown), Redis's commands processed and each edge's CPU:
# presence.csv, and the cost of the reconnect storm in presence-summary.json (issue #14).
# Env: PER_EDGE (15000), ROOMS (30), GIFT (1 per room per s), CHAT (4), SECS (45), DRAIN_AT (10),
# PERIOD_MS (10000), SCEN (drain), SHARDS (2 per edge; each holds at most ~20,000 connections
# here, RLIMIT_NOFILE bounding a ring's direct descriptors: the edges left after the drain must
# hold everyone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PER_EDGE=${PER_EDGE:-15000}
ROOMS=${ROOMS:-30}
GIFT=${GIFT:-1}
CHAT=${CHAT:-4}
SECS=${SECS:-45}
DRAIN_AT=${DRAIN_AT:-10}
PERIOD_MS=${PERIOD_MS:-10000}
SCEN=${SCEN:-drain}
SHARDS=${SHARDS:-2}
TOKEN=bench-drain-admin-token
cargo build -q --release -p edge -p loadgen
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done; sleep 1; pkill -f "redis-server 127.0.0.1:18799" || true; rm -rf "$TMP"; }
trap cleanup EXIT

redis-server --port 18799 --bind 127.0.0.1 --save "" --appendonly no >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p 18799 ping >/dev/null 2>&1 && break; sleep 0.1; done
"$ROOT/target/release/edge" dispatch --redis redis://127.0.0.1:18799 --http 127.0.0.1:18790 >"$TMP/dispatch.log" 2>&1 &
PIDS+=($!)
cat >"$TMP/edge.toml" <<TOML
shards = $SHARDS
admin_token = "$TOKEN"
bus = "redis://127.0.0.1:18799"
[ws]
backlog = 16384
[drain]
period_ms = $PERIOD_MS
deadline_ms = $((PERIOD_MS * 3))
dispatch_url = "http://127.0.0.1:18790/v1/route"
[limits]
room_rate = 5000.0
room_burst = 10000.0
TOML
for i in 1 2 3; do
  "$ROOT/target/release/edge" --config "$TMP/edge.toml" --listen 127.0.0.1:1870$i --http 127.0.0.1:1871$i \
    --advertise ws://127.0.0.1:1870$i/ws >"$TMP/edge$i.log" 2>&1 &
  PIDS+=($!)
  eval "E$i=$!"
done
for i in 1 2 3; do for _ in $(seq 50); do curl -sf 127.0.0.1:1871$i/healthz >/dev/null && break; sleep 0.2; done; done

OUT="$ROOT/bench-results/$(date +%Y-%m-%d)-$SCEN"
mkdir -p "$OUT"
# t, redis commands processed, CPU ticks of edges 1-3, then r0's online total and per-edge
# counts as edges 1 and 3 answer them.
sample_presence() {
  local t0 e c
  t0=$(date +%s.%N)
  echo "t_s,redis_commands,cpu_ticks_e1,cpu_ticks_e2,cpu_ticks_e3,online_via_e1,online_via_e3,edges_via_e1"
  while :; do
    c=$(redis-cli -p 18799 info stats 2>/dev/null | tr -d '\r' | awk -F: '/^total_commands_processed/ {print $2}')
    local cpu=()
    for e in "$E1" "$E2" "$E3"; do
      cpu+=("$(awk '{print $14 + $15}' "/proc/$e/stat" 2>/dev/null || echo "")")
    done
    local v1 v3
    v1=$(curl -s -m 1 127.0.0.1:18711/v1/rooms/r0 || true)
    v3=$(curl -s -m 1 127.0.0.1:18713/v1/rooms/r0 || true)
    printf '%s,%s,%s,%s,%s,%s,%s,"%s"\n' "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')" "$c" "${cpu[0]}" "${cpu[1]}" "${cpu[2]}" \
      "$(echo "$v1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("online",""))' 2>/dev/null)" \
      "$(echo "$v3" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("online",""))' 2>/dev/null)" \
      "$(echo "$v1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("online_edges",""))' 2>/dev/null | tr -d '"')"
    sleep 0.5
  done
}
sample_presence >"$OUT/presence.csv" &
SAMPLER=$!
PIDS+=("$SAMPLER")
"$ROOT/target/release/loadgen" run --target edge --ws 127.0.0.1:18701,127.0.0.1:18702,127.0.0.1:18703 \
  --http 127.0.0.1:18711 --connections $((PER_EDGE * 3)) --rooms "$ROOMS" --dist uniform --ramp 10000 \
  --src-addrs 16 --duration "$SECS" --gift-rate "$GIFT" --chat-rate "$CHAT" --out "$TMP/lg" --scenario drain \
  --note "3 edges (--shards $SHARDS) + redis + edge dispatch on this box; edge 2 drained at t=${DRAIN_AT}s, period ${PERIOD_MS} ms" \
  | tee "$TMP/loadgen.log" &
LG=$!
# Drain edge 2 DRAIN_AT seconds into publishing.
while ! grep -qE "^t=\s*${DRAIN_AT}\." "$TMP/loadgen.log" 2>/dev/null; do sleep 0.2; done
curl -s -X POST -H "Authorization: Bearer $TOKEN" 127.0.0.1:18712/v1/admin/drain
echo
wait "$LG"
kill "$SAMPLER" 2>/dev/null || true
wait "$E2"; echo "edge 2 exited: $?" | tee "$OUT/edge2-exit.txt"
cp -r "$TMP"/lg/*-drain/. "$OUT/"
python3 - "$OUT" "$DRAIN_AT" "$PER_EDGE" <<'PY'
import csv, json, sys
out, drain_at, per_edge = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = [r for r in csv.DictReader(open(f"{out}/presence.csv")) if r["redis_commands"]]
r = json.load(open(f"{out}/result.json"))
def rate(a, b, k):
    dt = float(b["t_s"]) - float(a["t_s"])
    try:
        return (float(b[k]) - float(a[k])) / dt if dt > 0 else 0.0
    except ValueError:
        return None
per = []
for a, b in zip(rows, rows[1:]):
    cpu = [rate(a, b, f"cpu_ticks_e{i}") for i in (1, 2, 3)]
    per.append({"t_s": round(float(b["t_s"]), 1), "redis_ops_per_s": round(rate(a, b, "redis_commands")),
                "edge_cpu_share": [None if c is None else round(c / 100, 3) for c in cpu],
                "online_via_e1": b["online_via_e1"], "online_via_e3": b["online_via_e3"]})
json.dump({"connections": r["connections"], "per_second": per}, open(f"{out}/presence-summary.json", "w"), indent=1)
PY
sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge2.log" | grep -E "drain|goaway" >"$OUT/edge2-drain.log" || true
cp "$TMP/loadgen.log" "$OUT/loadgen.log"
python3 - "$OUT" "$DRAIN_AT" <<'PY'
import json, re, sys
out, drain_at = sys.argv[1], float(sys.argv[2])
r = json.load(open(f"{out}/result.json"))
log = open(f"{out}/edge2-drain.log").read()
m = re.search(r"drain complete.*elapsed_ms=(\d+)", log)
s = [x for x in r["samples"] if x["t_s"] >= drain_at - 0.5]
rates = [b["reconnects"] - a["reconnects"] for a, b in zip(s, s[1:])]
during = [x for x in s if x["reconnects"] < r["reconnects"] or x is s[0]]
summary = {
    "connections": r["connections"], "moved": r["reconnects"], "move_failed": r["reconnect_failed"],
    "time_to_empty_ms": int(m.group(1)) if m else None,
    "reconnect_rate_max_per_s": max(rates) if rates else 0,
    "reconnect_ms_p50_p99": [r["reconnect_ms"]["p50"], r["reconnect_ms"]["p99"]],
    "gift_lost": r["lost"]["gift"], "gift_duplicates": r["duplicates"]["gift"], "chat_lost": r["lost"]["chat"],
    "gift_p99_ms_during_drain_max_of_seconds": max((x["gift_p99_ms"] for x in during), default=None),
    "gift_latency_ms_whole_run": r["latency_ms"]["gift"],
}
json.dump(summary, open(f"{out}/drain-summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
echo "results in $OUT"
