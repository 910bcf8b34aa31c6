#!/usr/bin/env bash
# The whole test suite: unit and integration tests of every crate (real io_uring edge, real
# kernel probes, real redis-server), the clients' tests, the deploy files checked by the tools
# that read them (and a real Prometheus scraping a real edge), then the Autobahn conformance run
# against the echo mode, and a short run of every fuzz target (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# One build configuration for everything: `cargo test` builds every binary the later steps run
# (a separate `cargo build --bins` resolves features without dev-dependencies and compiles the
# whole dependency tree a second time).
cargo test --workspace
# Clippy pedantic (opt-outs with their reasons in Cargo.toml) on every target, tests included,
# as errors: a new warning fails the run instead of piling up. Clippy checks the dependencies
# again (check metadata is not shared with the test build above): 6.5 min on a clean target
# dir on a busy 2-CPU box, under a minute once that is cached.
cargo clippy --workspace --all-targets -- -D warnings
./scripts/test-clients-ts.sh
./scripts/test-deploy.sh
./scripts/autobahn.sh
# A few seconds per fuzz target, from the committed seeds: a smoke test that every target
# builds and that nothing the fuzzer finds at once crashes. Long runs: scripts/fuzz.sh 300.
# ROOMCAST_FUZZ_SECONDS=0 skips it (the instrumented build takes a few minutes of its own).
if [[ ${ROOMCAST_FUZZ_SECONDS:-5} != 0 ]]; then
  ./scripts/fuzz.sh "${ROOMCAST_FUZZ_SECONDS:-5}"
fi
