#!/usr/bin/env bash
# Many rooms, one edge: CONNS connections spread over ROOMS rooms by a Zipf law, gifts GIFT/s and
# chat CHAT/s published per room (ROOMS * (GIFT + CHAT) publishes/s offered in total, by one
# synchronous HTTP publisher). Measures what the room engines cost per publish: numbering,
# admission, merging and serialization of every room, which the old design ran on one global bus
# thread and the new one spreads over the shard threads. Written for the issue "Room engines
# pinned to cores"; run it against both binaries (EDGE_BIN) with the same loadgen.
#
# Reports (loadgen's bench-results/<date>-$SCEN/, plus rooms.json and the edge's log/metrics
# there): admitted publishes/s, deliveries/s, gift latency, loss, edge CPU per delivery and per
# admitted publish (= edge CPU seconds over the run / publishes the edge accepted), RSS per
# connection, and the 1-minute load average when the run started.
#
# The edge gets limits far out of reach (room and must-deliver token buckets), so no publish is
# refused for rate; demand sampling and adaptive merging keep their defaults (no room here comes
# near the 500,000 deliveries/s that turns sampling on). Only config keys both the old (one bus
# thread) and new (engines on shards) edge accept are used.
#
# Env: EDGE_BIN (./target/release/edge), LOADGEN_BIN (./target/release/loadgen), CONNS (20000),
# ROOMS (1000), GIFT (1), CHAT (5), SECS (20), SHARDS (2), SCEN (rooms), NOTE (extra note text),
# EXTRA_TOML (appended to the edge's config, e.g. '[engine]\nplacement = "beside"'),
# PORT (WebSocket port, 18741; HTTP is PORT+1), WAIT_QUIET (1: wait for a quiet box first, at most
# 25 min, checking every 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
EDGE_BIN=${EDGE_BIN:-./target/release/edge}
LOADGEN_BIN=${LOADGEN_BIN:-./target/release/loadgen}
CONNS=${CONNS:-20000}
ROOMS=${ROOMS:-1000}
GIFT=${GIFT:-1}
CHAT=${CHAT:-5}
SECS=${SECS:-20}
SHARDS=${SHARDS:-2}
SCEN=${SCEN:-rooms}
NOTE=${NOTE:-}
PORT=${PORT:-18741}
HPORT=$((PORT + 1))
WAIT_QUIET=${WAIT_QUIET:-1}
EDGE_BIN=$(realpath "$EDGE_BIN")
LOADGEN_BIN=$(realpath "$LOADGEN_BIN")

# A quiet box: no compiler, test or benchmark running (or the load already below 1).
quiet() {
  local busy load
  busy=$(pgrep -f 'cargo (test|bench|build)|rustc|criterion|/deps/' || true)
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [[ -n $busy ]] && ! awk -v l="$load" 'BEGIN { exit !(l < 1.0) }'; then return 1; fi
  return 0
}
WAITED=0
if [[ $WAIT_QUIET == 1 ]]; then
  deadline=$((SECONDS + 25 * 60))
  until quiet; do
    if ((SECONDS >= deadline)); then
      echo "box not quiet after 25 min; running anyway" >&2
      break
    fi
    sleep 20
    WAITED=$((WAITED + 20))
  done
fi
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average at start: $LOAD_AT_START (waited ${WAITED}s)"

for p in "$PORT" "$HPORT"; do
  if ss -Htln "sport = :$p" | grep -q .; then
    echo "port $p is in use; set PORT" >&2
    exit 1
  fi
done

TMP=$(mktemp -d)
# Builds from before the store have no --data-dir (and would reject it).
DATA_ARGS=()
if "$EDGE_BIN" --help | grep -q -- --data-dir; then DATA_ARGS=(--data-dir "$TMP/data"); fi
cat >"$TMP/edge.toml" <<TOML
shards = $SHARDS
[ws]
backlog = 16384
[limits]
room_rate = 1000000.0
room_burst = 1000000.0
must_deliver_room_rate = 1000000.0
must_deliver_room_burst = 1000000.0
TOML
if [[ -n ${EXTRA_TOML:-} ]]; then printf '%b\n' "$EXTRA_TOML" >>"$TMP/edge.toml"; fi
"$EDGE_BIN" "${DATA_ARGS[@]}" --config "$TMP/edge.toml" --listen "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" >"$TMP/edge.log" 2>&1 &
EPID=$!
stop_edge() {
  if kill -0 "$EPID" 2>/dev/null; then
    kill -INT "$EPID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$EPID" 2>/dev/null || true
  fi
  wait "$EPID" 2>/dev/null || true
}
trap 'stop_edge; rm -rf "$TMP"' EXIT
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$HPORT/healthz" || true)
  [[ $code != 000 ]] && break
  kill -0 "$EPID" 2>/dev/null || { cat "$TMP/edge.log" >&2; echo "edge exited at start" >&2; exit 1; }
  sleep 0.1
done

SRC=()
if ((CONNS > 15000)); then SRC=(--ramp 10000 --src-addrs 16); fi
LG_RC=0
"$LOADGEN_BIN" run --target edge --ws "127.0.0.1:$PORT" --http "127.0.0.1:$HPORT" --dist zipf --rooms "$ROOMS" \
  --connections "$CONNS" "${SRC[@]}" --gift-rate "$GIFT" --chat-rate "$CHAT" --duration "$SECS" \
  --server-pid "$EPID" --out "$ROOT/bench-results" --scenario "$SCEN" --replace \
  --note "edge $(basename "$(dirname "$(dirname "$EDGE_BIN")")")/release/edge, shards $SHARDS, limits out of reach, [ws] backlog 16384; $ROOMS rooms (zipf), gift $GIFT/s + chat $CHAT/s per room; load average at start $LOAD_AT_START${NOTE:+; $NOTE}" ||
  LG_RC=$?

DIR=$ROOT/bench-results/$(date +%Y-%m-%d)-$SCEN
mkdir -p "$DIR"
curl -s "127.0.0.1:$HPORT/metrics" >"$DIR/edge-metrics.txt" || true
EDGE_ALIVE=yes
kill -0 "$EPID" 2>/dev/null || EDGE_ALIVE=no
stop_edge
trap 'rm -rf "$TMP"' EXIT
sed -E "s/\x1b\[[0-9;]*m//g" "$TMP/edge.log" >"$DIR/edge.log.full"
if (($(stat -c %s "$DIR/edge.log.full") > 2000000)); then
  { head -n 200 "$DIR/edge.log.full"; echo "[... cut ...]"; tail -n 200 "$DIR/edge.log.full"; } >"$DIR/edge.log"
  rm "$DIR/edge.log.full"
else
  mv "$DIR/edge.log.full" "$DIR/edge.log"
fi
sed -E "s/^[^ ]+ +//" "$DIR/edge.log" | grep -E "WARN|ERROR|panic" |
  sed -E "s/(slot|open|left|backlog|conn|fd)=[0-9]+/\1=N/g" | sort | uniq -c | sort -rn | head -40 >"$DIR/edge-warnings.log" || true

python3 - "$DIR" "$LOAD_AT_START" "$WAITED" "$LG_RC" "$EDGE_ALIVE" "$EDGE_BIN" "$CONNS" "$ROOMS" "$GIFT" "$CHAT" "$SECS" "$SHARDS" <<'PY'
import json, os, sys
d, load, waited, rc, alive, edge, conns, rooms, gift, chat, secs, shards = sys.argv[1:]
out = {"load_avg_at_start": load, "waited_for_quiet_s": int(waited), "loadgen_exit": int(rc),
       "edge_alive_after_run": alive == "yes", "edge_bin": edge, "conns": int(conns), "rooms": int(rooms),
       "gift_rate": float(gift), "chat_rate": float(chat), "secs": int(secs), "shards": int(shards)}
p = os.path.join(d, "result.json")
if os.path.exists(p):
    r = json.load(open(p))
    pub = sum(r["published"].values())
    cpu = r["server"]["cpu_s_publishing"]
    out.update({
        "offered_publishes_per_s": int(rooms) * (float(gift) + float(chat)),
        "admitted_publishes": pub,
        "admitted_publishes_per_s": pub / r["publish_secs"],
        "publish_refused": r["publish_refused"],
        "deliveries_per_s": r["deliveries_per_s"],
        "gift_p50_ms": r["latency_ms"]["gift"]["p50"], "gift_p99_ms": r["latency_ms"]["gift"]["p99"],
        "lost": r["lost"], "duplicates": r["duplicates"],
        "edge_cpu_s": cpu,
        "edge_cpu_us_per_delivery": r["server"]["cpu_us_per_delivery"],
        "edge_cpu_us_per_publish": cpu * 1e6 / pub if pub else None,
        "edge_cpu_cores": cpu / r["publish_secs"],
        "rss_bytes_per_connection": r["server"]["rss_bytes_per_connection"],
        "connections": r["connections"], "failed_connections": r["failed_connections"],
        "closed_during_run": r["closed_during_run"],
        "generator_max_worker_core_share": r["generator_max_worker_core_share"],
    })
json.dump(out, open(os.path.join(d, "rooms.json"), "w"), indent=2)
print(json.dumps(out, indent=2))
PY
echo "edge warnings (counted):"
cat "$DIR/edge-warnings.log"
exit "$LG_RC"
