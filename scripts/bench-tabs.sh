#!/usr/bin/env bash
# One connection per browser: TABS tabs of one browser (headless Chromium, one profile)
# subscribe to one user's events, with ssegate's browser client (shared, and `shared: false`:
# one stream per tab, what every client did before) and with Nchan's own browser client
# (NchanSubscriber, shared through localStorage, and not). Reports the server's streams with
# every tab open, and, HANDOVERS times, what the other tabs see when the oldest tab (the
# holder) closes while events are published every RATE_MS ms: the longest time without an
# event, and events lost or repeated. See tests/browser/tabs-bench.mjs.
#
#   ./scripts/bench-tabs.sh          # TABS=10 HANDOVERS=5 RATE_MS=10
source "$(dirname "$0")/bench-common.sh"
TABS=${TABS:-10}
HANDOVERS=${HANDOVERS:-5}
RATE_MS=${RATE_MS:-10}
[ -d tests/browser/node_modules/nchan ] && [ -d tests/browser/node_modules/playwright-core ] \
  || (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error) \
  || die "npm ci in tests/browser failed"
command -v ss >/dev/null || die "ss (iproute2) is needed to count the server's connections"
build
tabs_run() {
  local target=$1 shared=$2 http=$3
  local label="tabs-$target-$([ "$shared" = true ] && echo shared || echo per-tab)"
  log "$label: $TABS tabs, $HANDOVERS hand-overs"
  local cfg
  cfg=$(printf '{"target":"%s","label":"%s","http":"%s","publish":"http://%s","shared":%s,"tabs":%s,"handovers":%s,"rate_ms":%s}' \
    "$target" "$label" "$http" "$SSEGATE_GRPC" "$shared" "$TABS" "$HANDOVERS" "$RATE_MS")
  if ! taskset -c "$CLIENT_CPU" node tests/browser/tabs-bench.mjs "$cfg" | tee -a "$RESULTS"; then
    FAILED_RUNS+=("$label")
  fi
}
start_server ssegate --cors-allowed-origins '*'
tabs_run ssegate true "$SSEGATE_HTTP"
start_server ssegate --cors-allowed-origins '*'
tabs_run ssegate false "$SSEGATE_HTTP"
start_server nchan
tabs_run nchan true "$NCHAN_HTTP"
start_server nchan
tabs_run nchan false "$NCHAN_HTTP"
finish
