#!/usr/bin/env bash
# Installs everything roomcast needs on a fresh Debian/Ubuntu box and builds it.
# Idempotent: run it again at any time. Needs root (apt, mounts) and a Rust toolchain (rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages:
#   clang llvm libbpf-dev   compile the eBPF C programs (ebpf/build.rs)
#   bpftool                 inspect loaded programs (operators; not needed to build)
#   redis-server            the multi-edge bus and its tests (also redis-cli --cluster for the
#                           cluster tests, and `redis-server FILE --sentinel` for the Sentinel
#                           tests: no redis-sentinel package needed)
#   iproute2                `ss`, which the probe tests compare against
#   python3-venv            virtualenvs for the conformance suite
#   chromium                the TypeScript client's browser test (clients/ts, driven by playwright-core)
#   prometheus              promtool and a real Prometheus for the deploy tests (scripts/test-deploy.sh)
#   openssl                 the browser wss test's CA and certificate (clients/ts/test/e2e/tls.test.mjs)
#   nodejs npm              the TypeScript client (only when no node/npm is on the PATH: an
#                           existing Node.js, e.g. a newer one from elsewhere, is left alone)
PKGS=(clang llvm libbpf-dev bpftool redis-server iproute2 python3-venv curl chromium prometheus openssl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
had_node_exporter=$(dpkg -s prometheus-node-exporter >/dev/null 2>&1 && echo yes || true)
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts redis-server and prometheus (with its node exporter) when it installs them;
# roomcast's tests and benches start their own on free ports. Only a service this run installed
# (and so started) is stopped: one that was there before is the operator's and is left alone. (nginx + Nchan, the peer in the benchmark,
# are installed by scripts/setup-peers.sh, which scripts/bench-peers.sh calls.)
started=()
for pkg in redis-server prometheus; do
  [[ " ${missing[*]} " == *" $pkg "* ]] && started+=("$pkg")
done
# prometheus pulls in the node exporter: stopped too if it came with this run.
[[ " ${started[*]} " == *" prometheus "* && -z $had_node_exporter ]] && started+=(prometheus-node-exporter)
for svc in "${started[@]}"; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

# Kernel filesystems the probes use (tracepoints need tracefs; pinned maps need bpffs).
mountpoint -q /sys/fs/bpf 2>/dev/null || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
mountpoint -q /sys/kernel/tracing 2>/dev/null || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if ((node_major < 20)); then
  echo "setup: warning: Node.js $(node --version 2>/dev/null) is older than 20, which clients/ts supports" >&2
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust with rustup first" >&2; exit 1; }
# cargo-fuzz builds and runs the fuzz targets (scripts/fuzz.sh; a short run is part of
# scripts/test.sh). On the stable toolchain: scripts/fuzz.sh sets RUSTC_BOOTSTRAP=1 for it.
if ! command -v cargo-fuzz >/dev/null; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# ROOMCAST_SETUP_NO_BUILD=1: install only (CI, whose test command builds what it runs).
if [[ -z ${ROOMCAST_SETUP_NO_BUILD:-} ]]; then
  cargo build --release --workspace
fi
echo "setup: done. Start an edge with: cargo run --release -p edge"
