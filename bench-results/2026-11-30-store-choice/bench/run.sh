#!/bin/sh
# Runs every figure of ../README.md. Usage (from the repository root):
#   CARGO_TARGET_DIR=/work/target-store bench-results/2026-11-30-store-choice/bench/run.sh [BASE_DIR] > out.txt
# BASE_DIR (default /tmp/store-choice) holds the engines' data dirs; it is emptied per case.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${1:-/tmp/store-choice}
: "${CARGO_TARGET_DIR:=/work/target-store}"
export CARGO_TARGET_DIR
cargo build --release --quiet --manifest-path "$HERE/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/store-choice-bench
echo "# $(date -u +%FT%TZ) $(uname -r) nproc=$(nproc) load: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$BASE"
df -T "$BASE" 2>/dev/null | tail -1 | sed 's/^/# df: /' || true
# Durable (fdatasync per group): the engines side by side, commit by commit, plus a raw
# append+fdatasync of the same bytes; the disk's fsync latency drifts from minute to minute
# on this shared box (0.1 to 4 ms for one 210-byte append + fdatasync). 3 rounds.
for round in 1 2 3; do
  "$BIN" --dir "$BASE" --engines redb,fjall,log,log-pre --phases interleaved
done
# No fsync: CPU-bound, each engine alone; 2 rounds, order rotated.
for order in redb,fjall,log log,fjall,redb; do
  "$BIN" --dir "$BASE" --engines "$order" --phases probe,throughput-nd
done
# Retention churn (200,000 appends, keep 100 per room, groups of 256, durable) + restore.
for order in redb,fjall,log,log-pre,log-nocompact log-pre,log,fjall,redb; do
  "$BIN" --dir "$BASE" --engines "$order" --phases probe,churn
done
# SIGKILL mid-stream, and damaged tails.
"$BIN" --dir "$BASE" --engines redb,fjall,log,log-pre --phases crash,torn
echo "# end $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
