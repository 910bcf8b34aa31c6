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
./scripts/test-clients-ts.sh
./scripts/test-deploy.sh
./scripts/autobahn.sh
# A few seconds per fuzz target, from the committed seeds: a smoke test that every target
# builds and that nothing the fuzzer finds at once crashes. Long runs: scripts/fuzz.sh 300.
# ROOMCAST_FUZZ_SECONDS=0 skips it (the instrumented build takes a few minutes of its own).
if [[ ${ROOMCAST_FUZZ_SECONDS:-5} != 0 ]]; then
  ./scripts/fuzz.sh "${ROOMCAST_FUZZ_SECONDS:-5}"
fi
