#!/bin/sh
# Clean release build time of the bench with one engine each (same profile as roomcast's
# release: thin LTO, 4 codegen units). Each build gets its own empty target dir.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
T=${CARGO_TARGET_DIR:-/work/target-store}
for f in log redb fjall; do
  rm -rf "$T/ct-$f"
  s=$(date +%s.%N)
  CARGO_TARGET_DIR="$T/ct-$f" cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" \
    --no-default-features --features "$f"
  e=$(date +%s.%N)
  strip -o "$T/ct-$f/stripped" "$T/ct-$f/release/store-choice-bench"
  printf 'COMPILE engine=%s clean_release_s=%.1f stripped_binary_bytes=%s load=%s\n' "$f" \
    "$(echo "$e - $s" | bc)" "$(stat -c %s "$T/ct-$f/stripped")" \
    "$(cut -d' ' -f1 /proc/loadavg)"
  rm -rf "$T/ct-$f"
done
