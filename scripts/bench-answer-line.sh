#!/usr/bin/env bash
# Handshake latency of clients that connect while a shard is fanning gifts out: the 101 answer's
# wait behind room deliveries (ARCHITECTURE.md, "One message's path": the answer line).
#
# One edge with one shard; a base load generator holds BASE members (default 15,000: one ring's
# descriptor table holds ~20,000) in one room and publishes GIFTS gifts a second, so the shard is
# always in the middle of a fan-out of ~15 turns of 1,024 sends; 15 s later a second generator
# connects LATE members at LATE_RAMP a second and reports their handshake percentiles (connect
# to 101). Runs each build in BINS (directories holding `edge` and `loadgen`) one after the other
# and writes a table to OUT/README.md.
#
#   BINS="/tmp/rc-bin-old /tmp/rc-bin-new" scripts/bench-answer-line.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINS=${BINS:?set BINS to directories holding edge and loadgen builds, e.g. BINS="/tmp/old /tmp/new"}
BASE=${BASE:-15000}
GIFTS=${GIFTS:-20}
LATE=${LATE:-3000}
LATE_RAMP=${LATE_RAMP:-150}
SECS=${SECS:-45}
WS_PORT=${WS_PORT:-19411}
HTTP_PORT=${HTTP_PORT:-19412}
OUT=${OUT:-$ROOT/bench-results/$(date -u +%F)-answer-line}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/roomcast-answer-line.XXXXXX)
EP=
cleanup() {
  [[ -n $EP ]] && kill "$EP" 2>/dev/null && wait "$EP" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

one() {
  local bin=$1 name=$2 dir=$OUT/$2
  mkdir -p "$dir"
  # A rerun regenerates the build's results: loadgen refuses to write over an earlier run's
  # (and the builds compared may predate its --replace).
  rm -rf "$dir/base" "$dir/late"
  rm -rf "$WORK/data" && mkdir -p "$WORK/data"
  (cd "$WORK/data" && exec "$bin/edge" --listen 127.0.0.1:$WS_PORT --http 127.0.0.1:$HTTP_PORT --shards 1 --pin false) \
    >"$dir/edge.log" 2>&1 &
  EP=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null && break; sleep 0.1; done
  "$bin/loadgen" run --ws 127.0.0.1:$WS_PORT --http 127.0.0.1:$HTTP_PORT --connections "$BASE" --ramp 10000 \
    --gift-rate "$GIFTS" --chat-rate 0 --duration "$SECS" --server-pid "$EP" --out "$dir/base" >"$dir/base.txt" 2>&1 &
  local lb=$!
  sleep 15
  # Exits non-zero (it publishes nothing); its result.json has the handshake figures.
  "$bin/loadgen" run --ws 127.0.0.1:$WS_PORT --http 127.0.0.1:$HTTP_PORT --connections "$LATE" --ramp "$LATE_RAMP" \
    --gift-rate 0 --chat-rate 0 --duration 1 --out "$dir/late" >"$dir/late.txt" 2>&1 || true
  wait "$lb" || true
  curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep '^roomcast_handshake_seconds' >"$dir/edge-handshake-metrics.txt" || true
  kill "$EP"; wait "$EP" 2>/dev/null || true
  EP=
}

names=()
for b in $BINS; do
  name=$(basename "$b")
  names+=("$name")
  one "$b" "$name"
done

{
  echo "# Handshake latency of late joiners during a fan-out ($(date -u +%FT%TZ))"
  echo
  echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)."
  echo "Command: \`BINS=\"$BINS\" BASE=$BASE GIFTS=$GIFTS LATE=$LATE LATE_RAMP=$LATE_RAMP SECS=$SECS scripts/bench-answer-line.sh\`"
  echo
  echo "| build | late joiners' handshake p50 / p90 / p99 / max (ms) | base members' gift latency p50 / p99 (ms) | edge CPU µs per delivery |"
  echo "|---|---|---|---|"
  for n in "${names[@]}"; do
    python3 - "$OUT/$n" "$n" <<'PY'
import glob, json, sys
d, n = sys.argv[1], sys.argv[2]
late = json.load(open(glob.glob(d + "/late/*/result.json")[0]))
base = json.load(open(glob.glob(d + "/base/*/result.json")[0]))
h, g = late["handshake_ms"], base["latency_ms"]["gift"]
cpu = base["server"].get("cpu_us_per_delivery")
cpu = f"{cpu:.2f}" if cpu else "-"
print(f"| {n} | {h['p50']} / {h['p90']} / {h['p99']} / {h['max']} | {g['p50']} / {g['p99']} | {cpu} |")
PY
  done
} >"$OUT/README.md"
cat "$OUT/README.md"
