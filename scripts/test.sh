#!/usr/bin/env bash
# The project's test command. Run from the repository root:
#
#   ./scripts/test.sh [extra cargo test args...]
#
# On a fresh Debian (bookworm) machine it first installs what the tests need,
# idempotently and quietly:
#   - Chromium (Debian packages chromium chromium-driver fonts-liberation), used
#     by the browser EventSource tests through tests/browser/driver.mjs;
#   - the driver's npm dependencies (npm ci in tests/browser);
#   - nats-server (Debian package), started by the cluster tests on loopback ports.
# Then it runs `cargo test --locked --workspace "$@"` (the server and the load generator
# in bench/).
#
# A full run (no arguments) then also runs ./scripts/examples.sh with
# SSEGATE_BIN=target/debug/ssegate (the binary `cargo test` just built; under
# $CARGO_TARGET_DIR if that is set): the Java, Python and Node publisher examples against
# the real server, with an SSE reader checking delivery. It installs their toolchains
# itself (Debian grpc-java packages, a Python venv under target/, npm ci in examples/node).
# A filtered run (any argument, e.g. `./scripts/test.sh --test api publish`) runs only
# `cargo test` and skips the examples.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/test.sh: error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly if we are root, through sudo if available.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
  else
    die "need root (or sudo) to run: $*"
  fi
}

ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "/usr/bin/chromium is missing and apt-get is not available to install it"
  log "installing Chromium (apt-get install chromium chromium-driver fonts-liberation)"
  local aptlog
  aptlog="$(mktemp)"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    die "apt-get update failed (see output above)"
  fi
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-liberation >"$aptlog" 2>&1; then
    cat "$aptlog" >&2
    rm -f "$aptlog"
    die "could not install Chromium with apt-get (see output above)"
  fi
  rm -f "$aptlog"
  [ -x /usr/bin/chromium ] || die "Chromium was installed but /usr/bin/chromium is still missing"
}

ensure_browser_driver_deps() {
  if [ -d tests/browser/node_modules/playwright-core ]; then
    return 0
  fi
  command -v node >/dev/null 2>&1 || die "node is not installed (needed by tests/browser/driver.mjs)"
  command -v npm >/dev/null 2>&1 || die "npm is not installed (needed to install tests/browser dependencies)"
  log "installing browser driver dependencies (npm ci in tests/browser)"
  local npmlog
  npmlog="$(mktemp)"
  if ! (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) >"$npmlog" 2>&1; then
    cat "$npmlog" >&2
    rm -f "$npmlog"
    die "npm ci in tests/browser failed (see output above)"
  fi
  rm -f "$npmlog"
  [ -d tests/browser/node_modules/playwright-core ] \
    || die "npm ci finished but tests/browser/node_modules/playwright-core is missing"
}

ensure_nats_server() {
  if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "nats-server is missing and apt-get is not available to install it"
  log "installing nats-server (apt-get install nats-server), for the cluster tests"
  local aptlog
  aptlog="$(mktemp)"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server \
      >"$aptlog" 2>&1; then
    # The package index may be stale on a fresh machine.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$aptlog" 2>&1 || true
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server \
        >>"$aptlog" 2>&1; then
      cat "$aptlog" >&2
      rm -f "$aptlog"
      die "could not install nats-server with apt-get (see output above)"
    fi
  fi
  rm -f "$aptlog"
}

ensure_chromium
ensure_browser_driver_deps
ensure_nats_server

export CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"

log "cargo test --locked --workspace $*"
cargo test --locked --workspace "$@"

if [ "$#" -eq 0 ]; then
  log "publisher examples (scripts/examples.sh)"
  SSEGATE_BIN="${CARGO_TARGET_DIR:-target}/debug/ssegate" ./scripts/examples.sh
fi
