#!/usr/bin/env bash
# --data-dir (issue 21): the same runs with and without the data dir, in one run.
# - Ingest with 1k subscribers (one user each): unary Publish (64 in flight) and PublishStream
#   (4 streams x 1024 in flight), each in memory, with --data-dir (--data-sync always, the
#   default) and with --data-sync 10ms; every run starts from an empty directory.
# - Fan-out, one topic, 1k subscribers x 100 events/s (about half a core: below saturation,
#   where CPU per delivery compares), from 4 publishers: ssegate in memory and with
#   --data-dir, beside nginx+Nchan and the baseline (CPU per delivery, user and system).
# - Restart: a data dir holding a full 64 MiB replay log (65k events of 1 kB), the time from
#   the process start to /readyz 200 after a clean stop (SIGTERM) and after kill -9, and the
#   directory's size.
#
#   ./scripts/bench-durable.sh         # CONNS=1000 FANOUT_CONNS=1000 DURATION=10s REPEATS=2
#   PARTS="fanout restart" ./scripts/bench-durable.sh   # some of: ingest fanout restart
source "$(dirname "$0")/bench-common.sh"
CONNS=${CONNS:-1000}
FANOUT_CONNS=${FANOUT_CONNS:-1000}
DURATION=${DURATION:-10s}
REPEATS=${REPEATS:-2}
PARTS=${PARTS:-"ingest fanout restart"}
DATA=$SCRATCH/data
build
part() { [[ " $PARTS " == *" $1 "* ]]; }

# ingest LABEL [server flags...]: unary and stream ingest against a fresh server.
ingest() {
  local label=$1; shift
  rm -rf "$DATA"
  start_server ssegate "$@"
  bench ssegate "ingest-unary$label" --connections "$CONNS" --to user --rate max --api unary \
    --concurrency 64 --duration "$DURATION"
  rm -rf "$DATA"
  start_server ssegate "$@"
  bench ssegate "ingest-stream$label" --connections "$CONNS" --to user --rate max --api stream \
    --concurrency 4 --window 1024 --duration "$DURATION"
}

for rep in $(seq 1 "$REPEATS"); do
  part ingest || break
  ingest ""
  ingest "-data-always" --data-dir "$DATA"
  ingest "-data-10ms" --data-dir "$DATA" --data-sync 10ms
done

for rep in $(seq 1 "$REPEATS"); do
  part fanout || break
  for target in $TARGETS; do
    start_server "$target"
    bench "$target" fanout-100 --connections "$FANOUT_CONNS" --topics 1 --to topic --rate 100 \
      --concurrency 4 --duration 20s
  done
  rm -rf "$DATA"
  start_server ssegate --data-dir "$DATA"
  bench ssegate fanout-100-data --connections "$FANOUT_CONNS" --topics 1 --to topic --rate 100 \
    --concurrency 4 --duration 20s
done

# ready_after: starts ssegate on $DATA with the restart flags and sets READY_MS to the
# milliseconds from the start to /readyz 200 (the process keeps running as SERVER_PID).
RESTART_FLAGS=(--data-dir "$DATA" --replay-capacity 1000000 --replay-max-age 1h)
ready_after() {
  local t0 t1
  t0=$(date +%s%N)
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$BIN/ssegate" serve --http-addr "$SSEGATE_HTTP" \
    --grpc-addr "$SSEGATE_GRPC" --admin-addr "$SSEGATE_ADMIN" --insecure-dev-identity \
    --insecure-open-publish "${RESTART_FLAGS[@]}" >>"$SCRATCH/ssegate.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 6000); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$SSEGATE_ADMIN/readyz")" = 200 ]; then
      t1=$(date +%s%N)
      READY_MS=$(((t1 - t0) / 1000000))
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || die "ssegate exited during the restart (see $SCRATCH/ssegate.log)"
    sleep 0.005
  done
  die "not ready within 30 s"
}

part restart || { finish; exit; }
rm -rf "$DATA"
# The subscriber's queue holds the whole burst (it is there to check the events, not to be cut).
start_server ssegate "${RESTART_FLAGS[@]}" --queue-capacity 65536 --max-queue-bytes 268435456
bench ssegate restart-fill --connections 1 --to user --rate max --api stream --concurrency 4 \
  --window 1024 --payload-bytes 1000 --max-events 65000 --duration 120s
replay_bytes=$(curl -s "http://$SSEGATE_ADMIN/metrics" | awk '/^ssegate_replay_log_bytes /{print $2}')
stop_server
for rep in $(seq 1 "$REPEATS"); do
  ready_after; ms=$READY_MS
  rss=$(awk '/VmRSS/{print $2}' "/proc/$SERVER_PID/status")
  log "restart after a clean stop: ready in $ms ms (replay log $replay_bytes bytes before; data dir $(du -sm "$DATA" | cut -f1) MiB; RSS ${rss} kB)"
  echo "{\"label\":\"restart-clean\",\"ready_ms\":$ms,\"replay_bytes\":${replay_bytes:-0},\"rss_kb\":$rss}" >>"$RESULTS"
  kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
  ready_after; ms=$READY_MS
  log "restart after kill -9: ready in $ms ms"
  echo "{\"label\":\"restart-kill9\",\"ready_ms\":$ms}" >>"$RESULTS"
  stop_server
done
finish
