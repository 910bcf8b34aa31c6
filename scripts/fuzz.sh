#!/usr/bin/env bash
# Builds and runs every fuzz target (fuzz/: cargo-fuzz, libFuzzer) for SECONDS each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 20 seconds, every target)
#
# Each target starts from its committed seeds (fuzz/corpus/TARGET, read only) and from what
# earlier runs on this machine kept (target/fuzz/corpus/TARGET, where new inputs go). Prints
# the executions and the corpus size per target; exits non-zero if any target crashed (the
# input is in fuzz/artifacts/TARGET/: replay it with `RUSTC_BOOTSTRAP=1 cargo fuzz run
# --fuzz-dir fuzz -s none -a TARGET FILE`). Needs cargo-fuzz (scripts/setup.sh installs it).
#
# Build flags: `-s none`: no AddressSanitizer. The parsers are safe Rust (roomcast-proto and
# the sock_diag parser forbid unsafe code), so ASan would find nothing and costs a slower build
# and 2x slower runs; libFuzzer's coverage instrumentation is all the fuzzing needs. `-a`:
# debug assertions and overflow checks, so arithmetic that would wrap on hostile input fails.
# `RUSTC_BOOTSTRAP=1`: cargo-fuzz passes `-Z` flags; this lets the stable toolchain take them.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-20}
shift || true
# At least 1: libFuzzer reads -max_total_time=0 as "no limit".
[[ $secs =~ ^[0-9]+$ && $secs -ge 1 ]] || { echo "usage: $0 [SECONDS >= 1] [TARGET...]" >&2; exit 2; }
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz not found: run scripts/setup.sh" >&2; exit 1; }

export RUSTC_BOOTSTRAP=1
# Its own target directory (instrumented builds share nothing with the others), under the
# workspace's, so `cargo clean` takes it too.
out="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
opts=(--fuzz-dir fuzz --target-dir "$out" --sanitizer none --debug-assertions)

mapfile -t known < <(cargo fuzz list --fuzz-dir fuzz)
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=("${known[@]}")
fi
for t in "${targets[@]}"; do
  [[ " ${known[*]} " == *" $t "* ]] || { echo "fuzz: no target '$t' (targets: ${known[*]})" >&2; exit 2; }
done

cargo fuzz build "${opts[@]}"

mkdir -p "$out/logs"
failed=()
printf '%-16s %12s %8s %10s %s\n' target executions corpus exec/s result
for t in "${targets[@]}"; do
  work="$out/corpus/$t"
  log="$out/logs/$t.log"
  mkdir -p "$work"
  result=ok
  # -timeout: an input taking over 10 s is a hang, reported like a crash.
  if ! nice -n 19 cargo fuzz run "${opts[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    result="CRASH (log: $log)"
    failed+=("$t")
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # Inputs in the corpus after the run: the seeds and what this and earlier runs kept.
  corpus=$(($(find "$work" -type f | wc -l) + $(find "fuzz/corpus/$t" -type f | wc -l)))
  printf '%-16s %12s %8s %10s %s\n' "$t" "${execs:-?}" "$corpus" "${rate:-?}" "$result"
done

if ((${#failed[@]})); then
  echo "fuzz: crashed: ${failed[*]}" >&2
  for t in "${failed[@]}"; do
    echo "--- $t (last lines of $out/logs/$t.log)" >&2
    tail -n 40 "$out/logs/$t.log" >&2
  done
  exit 1
fi
