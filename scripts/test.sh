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
# Then ./scripts/client-libraries.sh: third-party SSE client libraries (npm eventsource,
# fetch-event-source in Chromium, httpx-sse) through a server restart and a resume gap.
# A filtered run (any argument, e.g. `./scripts/test.sh --test api publish`) runs only
# `cargo test` and skips the examples.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCRIPT=scripts/test.sh
# shellcheck source=scripts/lib/install.sh
source scripts/lib/install.sh

ensure_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  apt_install chromium chromium-driver fonts-liberation
  [ -x /usr/bin/chromium ] || die "Chromium was installed but /usr/bin/chromium is still missing"
}

ensure_browser_driver_deps() {
  [ -d tests/browser/node_modules/playwright-core ] && return 0
  log "installing browser driver dependencies (npm ci in tests/browser)"
  quietly "npm ci in tests/browser" bash -c 'cd tests/browser && npm ci --no-audit --no-fund --loglevel=error'
  [ -d tests/browser/node_modules/playwright-core ] \
    || die "npm ci finished but tests/browser/node_modules/playwright-core is missing"
}

ensure_nats_server() {
  if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    return 0
  fi
  apt_install nats-server
}

ensure_chromium
ensure_node_toolchain
ensure_browser_driver_deps
ensure_nats_server

export CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"

log "cargo test --locked --workspace $*"
cargo test --locked --workspace "$@"

if [ "$#" -eq 0 ]; then
  log "publisher examples (scripts/examples.sh)"
  SSEGATE_BIN="${CARGO_TARGET_DIR:-target}/debug/ssegate" ./scripts/examples.sh
  log "client libraries (scripts/client-libraries.sh)"
  SSEGATE_BIN="${CARGO_TARGET_DIR:-target}/debug/ssegate" ./scripts/client-libraries.sh
fi
