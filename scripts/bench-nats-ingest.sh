#!/usr/bin/env bash
# Ingest through the NATS JetStream backplane (issue 26, goal 1), beside the broker's own
# figure in the same run: a fresh `nats-server -js` and one ssegate replica (both pinned to the
# server CPU) with 1k subscribers; unary Publish with 64 calls in flight, PublishStream with one
# stream of 64 in flight and with 4 streams of 1,024; and `ssegate-bench raw-nats`, a plain
# async-nats JetStream publisher (4 tasks × 1,024 in flight) on a stream of the same kind, the
# broker's limit. DURATION each, REPEATS times.
#
#   ./scripts/bench-nats-ingest.sh          # CONNS=1000 DURATION=10s REPEATS=2
#   BEFORE_BIN=path/to/older/ssegate ./scripts/bench-nats-ingest.sh   # the same runs with an
#                                           # older build too, labelled -before
source "$(dirname "$0")/bench-common.sh"
BACKPLANE=nats
CONNS=${CONNS:-1000}
DURATION=${DURATION:-10s}
REPEATS=${REPEATS:-2}
build
# The broker's CPU seconds (user, system) from /proc: each run logs the broker's share of the
# server core, which the load generator's report (ssegate's process only) does not include.
broker_cpu() { awk '{printf "%.2f %.2f", $14 / 100, $15 / 100}' "/proc/$NATS_PID/stat"; }
broker_bench() {
  local before after
  before=$(broker_cpu)
  bench "$@"
  after=$(broker_cpu)
  # shellcheck disable=SC2086
  set -- $before $after
  log "broker CPU during the run: $(awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" 'BEGIN { printf "user %.2f s, system %.2f s", c - a, d - b }')"
}
raw() {
  log "raw-nats (the broker's own figure)"
  if ! taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" raw-nats --nats-url "$NATS_URL" --broker-pid "$NATS_PID" \
    --publishers 4 --window 1024 --duration "$DURATION" | tee -a "$RESULTS"; then
    FAILED_RUNS+=("raw-nats")
  fi
}
ssegate_runs() {
  local suffix=$1
  start_server ssegate
  broker_bench ssegate "ingest-unary-64$suffix" --connections "$CONNS" --to user --rate max --api unary \
    --concurrency 64 --duration "$DURATION"
  start_server ssegate
  broker_bench ssegate "ingest-stream-1x64$suffix" --connections "$CONNS" --to user --rate max --api stream \
    --concurrency 1 --window 64 --duration "$DURATION"
  start_server ssegate
  broker_bench ssegate "ingest-stream-4x1024$suffix" --connections "$CONNS" --to user --rate max --api stream \
    --concurrency 4 --window 1024 --duration "$DURATION"
}
for rep in $(seq 1 "$REPEATS"); do
  start_server ssegate
  raw
  ssegate_runs ""
  if [ -n "${BEFORE_BIN:-}" ]; then
    SSEGATE_BIN=$BEFORE_BIN ssegate_runs "-before"
  fi
done
finish
