#!/usr/bin/env bash
# Runs third-party SSE client libraries against the real server, through a server restart and
# a resume gap, and checks what each hands the application (tests/clients/run.py says how).
# docs/client-libraries.md is the table these runs back. Run from anywhere:
#
#   [SSEGATE_BIN=target/debug/ssegate] ./scripts/client-libraries.sh [--only SLUG ...]
#
# Libraries: npm eventsource 5.1.5 and 4.1.1 (Node), @microsoft/fetch-event-source 2.0.1 and
# Chromium's own EventSource (headless Chromium), httpx-sse 0.4.3 (Python). Each gets a server
# of its own on 127.0.0.1 (ports chosen by the kernel, kept across the restart) with --data-dir
# in a temporary directory. One line is printed per library, then `client-libraries: N passed,
# M failed`; the exit status is non-zero if any failed (logs in target/clients/logs/).
#
# Installs what is missing, idempotently and quietly (output shown only on failure):
#   - Chromium (Debian packages chromium chromium-driver fonts-liberation), unless
#     CHROMIUM_PATH names one;
#   - `npm ci` in tests/clients (package-lock.json: the libraries and playwright-core);
#   - httpx-sse and httpx (tests/clients/requirements.txt) in a venv at target/clients/venv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SSEGATE_BIN="${SSEGATE_BIN:-target/debug/ssegate}"
WORK=target/clients

SCRIPT=scripts/client-libraries.sh
# shellcheck source=scripts/lib/install.sh
source scripts/lib/install.sh

ensure_chromium() {
  if [ -n "${CHROMIUM_PATH:-}" ]; then
    [ -x "$CHROMIUM_PATH" ] || die "CHROMIUM_PATH=$CHROMIUM_PATH is not an executable"
    return 0
  fi
  if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium chromium-driver fonts-liberation
    [ -x /usr/bin/chromium ] || die "Chromium was installed but /usr/bin/chromium is still missing"
  fi
  export CHROMIUM_PATH=/usr/bin/chromium
}

ensure_node() {
  ensure_npm_ci tests/clients "the npm client libraries"
}

ensure_python() {
  ensure_venv "$WORK/venv" tests/clients/requirements.txt "httpx-sse and httpx"
}

main() {
  [ -x "$SSEGATE_BIN" ] || die "no server binary at $SSEGATE_BIN (run cargo build, or set SSEGATE_BIN)"
  mkdir -p "$WORK"
  ensure_chromium
  ensure_node
  ensure_python
  log "client libraries against $SSEGATE_BIN (tests/clients/run.py)"
  python3 tests/clients/run.py --bin "$SSEGATE_BIN" --python "$WORK/venv/bin/python" --work "$WORK" "$@" \
    || die "a client library failed (above; logs in $WORK/logs/)"
}

main "$@"
