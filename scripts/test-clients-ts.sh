#!/usr/bin/env bash
# The TypeScript client (clients/ts): install its dev dependencies from the lock file, build it
# (tsc), run its unit tests, then its end-to-end tests: the demo page in headless Chromium and
# 1,000 Node clients, against the real edge binary and a redis-server of their own on loopback.
#   ROOMCAST_EDGE_BIN  edge binary (default target/debug/edge, which cargo test builds)
#   CHROMIUM_BIN       browser (default /usr/bin/chromium, Debian's package; scripts/setup.sh)
#   ROOMCAST_E2E_OUT   where the screenshot goes (default target/e2e)
set -euo pipefail
cd "$(dirname "$0")/.."
export ROOMCAST_EDGE_BIN="${ROOMCAST_EDGE_BIN:-$PWD/target/debug/edge}"
export ROOMCAST_E2E_OUT="${ROOMCAST_E2E_OUT:-$PWD/target/e2e}"
fail() { echo "test-clients-ts: $*" >&2; exit 1; }
[[ -x "$ROOMCAST_EDGE_BIN" ]] || fail "no edge binary at $ROOMCAST_EDGE_BIN (cargo test --workspace --no-run)"
command -v node >/dev/null || fail "node not found (scripts/setup.sh installs it)"
command -v npm >/dev/null || fail "npm not found (scripts/setup.sh installs it)"
command -v redis-server >/dev/null || fail "redis-server not found (scripts/setup.sh installs it)"
[[ -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]] || fail "no Chromium at ${CHROMIUM_BIN:-/usr/bin/chromium} (scripts/setup.sh installs it)"

cd clients/ts
echo "test-clients-ts: npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "test-clients-ts: build + unit tests"
npm test
echo "test-clients-ts: end-to-end tests (edge: $ROOMCAST_EDGE_BIN)"
node --test --test-concurrency=1 test/e2e/
