#!/usr/bin/env bash
# Dispatch under a reconnect storm: what one `GET /v1/route` costs the dispatch endpoint and
# Redis, and how long clients wait for it, when many clients ask at once (ARCHITECTURE.md,
# "Several edges": the reports' cache).
#
# One Redis, two edges reporting their load to it (one shard each), and a stand-alone
# `edge dispatch`; curl then sends REQUESTS requests (default 20,000), PAR at a time (default
# 64), each on a new connection as a reconnecting client's would be. Reports per build in BINS
# (directories holding an `edge` binary), one after the other: dispatch's and Redis's CPU per
# request (utime + stime from /proc), Redis's MGET calls (INFO commandstats), requests a second,
# and curl's time per request (p50/p99/max). Writes OUT/README.md.
#
#   BINS="/tmp/rc-old /tmp/rc-new" scripts/bench-dispatch.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINS=${BINS:?set BINS to directories holding edge builds, e.g. BINS="/tmp/old /tmp/new"}
REQUESTS=${REQUESTS:-20000}
PAR=${PAR:-64}
REDIS_PORT=${REDIS_PORT:-19519}
DISPATCH_PORT=${DISPATCH_PORT:-19513}
OUT=${OUT:-$ROOT/bench-results/$(date -u +%F)-dispatch}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/roomcast-dispatch.XXXXXX)
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_all
  rm -rf "$WORK"
}
trap cleanup EXIT

# utime + stime of a process, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
mgets() { redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_mget:calls=\([0-9]*\),.*/\1/p'; }

ROWS=()
one() {
  local bin=$1 name dir
  name=$(basename "$bin")
  dir=$OUT/$name
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$dir/redis.log" 2>&1 &
  local rp=$!
  PIDS+=("$rp")
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  for i in 1 2; do
    mkdir -p "$WORK/$name-$i"
    (cd "$WORK/$name-$i" && exec "$bin/edge" --listen "127.0.0.1:$((19520 + i))" --http "127.0.0.1:$((19530 + i))" \
      --shards 1 --pin false --bus "redis://127.0.0.1:$REDIS_PORT" --no-store) >"$dir/edge-$i.log" 2>&1 &
    PIDS+=("$!")
  done
  "$bin/edge" dispatch --redis "redis://127.0.0.1:$REDIS_PORT" --http "127.0.0.1:$DISPATCH_PORT" --backlog 4096 \
    >"$dir/dispatch.log" 2>&1 &
  local dp=$!
  PIDS+=("$dp")
  local url="http://127.0.0.1:$DISPATCH_PORT/v1/route?room=storm"
  # Both edges reported: dispatch names both.
  for _ in $(seq 100); do
    [[ $(for _ in $(seq 20); do curl -s "$url"; echo; done | grep -o '"edge":"[^"]*"' | sort -u | wc -l) == 2 ]] && break
    sleep 0.1
  done
  local d0 r0 m0 t0 t1
  d0=$(ticks "$dp"); r0=$(ticks "$rp"); m0=$(mgets)
  t0=$(date +%s.%N)
  curl -s -Z --parallel-max "$PAR" -H 'Connection: close' -w '\nT %{http_code} %{time_total}\n' \
    "$url&n=[1-$REQUESTS]" >"$WORK/$name-curl.out"
  t1=$(date +%s.%N)
  local d1 r1 m1
  d1=$(ticks "$dp"); r1=$(ticks "$rp"); m1=$(mgets)
  local hz
  hz=$(getconf CLK_TCK)
  ROWS+=("$(python3 - "$name" "$WORK/$name-curl.out" "$REQUESTS" "$t0" "$t1" "$d0" "$d1" "$r0" "$r1" "$m0" "$m1" "$hz" <<'PY'
import sys
name, path, n, t0, t1, d0, d1, r0, r1, m0, m1, hz = sys.argv[1:]
n, hz = int(n), int(hz)
times, codes = [], {}
for line in open(path):
    if line.startswith("T "):
        _, code, t = line.split()
        codes[code] = codes.get(code, 0) + 1
        times.append(float(t) * 1000)
times.sort()
pct = lambda p: times[min(len(times) - 1, int(p * len(times)))]
wall = float(t1) - float(t0)
us = lambda a, b: (int(b) - int(a)) / hz * 1e6 / n
print(f"| {name} | {n:,} | {', '.join(f'{k}: {v:,}' for k, v in sorted(codes.items()))} | {n / wall:,.0f} "
      f"| {us(d0, d1):.0f} | {us(r0, r1):.1f} | {int(m1) - int(m0):,} "
      f"| {pct(0.5):.1f} / {pct(0.99):.1f} / {times[-1]:.1f} |")
PY
)")
  stop_all
}

for b in $BINS; do one "$b"; done

{
  echo "# Dispatch under a reconnect storm"
  echo
  echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr); $(date -u +%FT%TZ)."
  echo
  echo '```sh'
  echo "BINS=\"$BINS\" REQUESTS=$REQUESTS PAR=$PAR scripts/bench-dispatch.sh"
  echo '```'
  echo
  echo "Two edges report to one Redis; \`edge dispatch\` answers curl's $REQUESTS requests, $PAR at a time,"
  echo "each on a new connection. CPU per request from /proc (utime + stime over the run, 10 ms ticks)."
  echo
  echo "| build | requests | answers | requests/s | dispatch CPU per request (µs) | Redis CPU per request (µs) | Redis MGETs | time per request p50 / p99 / max (ms) |"
  echo "|---|---|---|---|---|---|---|---|"
  for r in "${ROWS[@]}"; do echo "$r"; done
} >"$OUT/README.md"
cat "$OUT/README.md"
