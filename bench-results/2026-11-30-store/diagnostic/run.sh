#!/usr/bin/env bash
# Diagnostic for the 0.2-0.5 s acknowledgement stalls seen with one room and the store on:
# one room, fsync "always", 64 clients, 20 s measured, with the default history bound (10,000
# must-deliver messages per room, so the room evicts all along) and with the bound raised to
# 1,000,000 (nothing evicted during the run). pubbench prints the slowest ack of each second.
# Usage: EDGE=... LG=... run.sh OUTDIR   (edge and loadgen binaries as built by bench-store.sh;
# the earlier run in earlier-8082c39/diagnostic waited with an equivalent script outside the tree)
set -euo pipefail
OUTD=$1
mkdir -p "$OUTD"
EDGE=${EDGE:-/work/target-bench/release/edge}
LG=${LG:-/work/target-bench/release/loadgen}
PORT=18785
# A quiet box: no cargo, rustc, test binary or debug edge running and a 1-minute load average
# under 1 (at most 20 min, then it runs anyway and says so).
waitq() {
  local w=0
  busy() { pgrep -f 'cargo (test|bench|build|clippy)|rustc|/deps/|target/debug/edge' || true; }
  while [[ -n $(busy) ]] || awk -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN { exit !(l >= 1.0) }'; do
    if ((w >= 1200)); then echo "NOT QUIET after ${w}s: $(cat /proc/loadavg)"; return 0; fi
    sleep 10
    w=$((w + 10))
  done
  echo "quiet after ${w}s: $(cat /proc/loadavg)"
}
for hist in default 1000000; do
  for rep in 1 2; do
    name=always-rooms1-c64-hist$hist-$rep
    d=$(mktemp -d /tmp/store-diag.XXXXXX)
    {
      echo "shards = 2"
      printf '[probes]\nsource = "off"\n[limits]\nmust_deliver_room_rate = 1e9\nmust_deliver_room_burst = 1e9\n[store]\nfsync = "always"\n'
      if [[ $hist != default ]]; then printf '[history]\nmust_deliver = %s\nmust_deliver_bytes = 1073741824\n' "$hist"; fi
    } >"$OUTD/$name.toml"
    waitq >"$OUTD/$name.box.txt"
    "$EDGE" --config "$OUTD/$name.toml" --data-dir "$d/data" --listen 127.0.0.1:$PORT --http 127.0.0.1:$((PORT + 1)) >"$d/edge.log" 2>&1 &
    ep=$!
    for _ in $(seq 100); do curl -s -o /dev/null "127.0.0.1:$((PORT + 1))/healthz" && break; sleep 0.1; done
    "$LG" pubbench --http 127.0.0.1:$((PORT + 1)) --rooms 1 --concurrency 64 --duration 20 --warmup 2 --server-pid "$ep" \
      --label "$name" --out "$OUTD/$name.json" >/dev/null 2>"$OUTD/$name.err"
    kill -TERM $ep; wait $ep || true
    sed -E "s/\x1b\[[0-9;]*m//g" "$d/edge.log" | grep -vE "^\s*$" | tail -n 20 >"$OUTD/$name.edge.log"
    rm -rf "$d"
    echo "$name: $(tr '\n' ' ' <"$OUTD/$name.err")"
  done
done
