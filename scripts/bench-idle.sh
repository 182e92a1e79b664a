#!/usr/bin/env bash
# Scenario 1, idle connections: 5k, 10k and 19k SSE connections held 60 s with heartbeats,
# against ssegate, nginx+Nchan and the baseline; reports server RSS per connection.
#
#   ./scripts/bench-idle.sh            # SIZES="5000 10000 19000" HOLD=60s REPEATS=2
#   CONNECT_CONCURRENCY=0 SIZES=10000 TARGETS=ssegate ./scripts/bench-idle.sh   # all at once
#
# Each run reports how many connections were answered 200 and how the others failed (refused,
# closed without a response, non-200); a run that did not get all of them fails (see
# bench-common.sh).
#
# Every server runs fresh for each measurement (its RSS "before" is a clean start).
source "$(dirname "$0")/bench-common.sh"
SIZES=${SIZES:-"5000 10000 19000"}
HOLD=${HOLD:-60s}
REPEATS=${REPEATS:-2}
build
for n in $SIZES; do
  for rep in $(seq 1 "$REPEATS"); do
    for target in $TARGETS; do
      start_server "$target"
      bench "$target" "idle-$n" --connections "$n" --duration "$HOLD" --rate 0
    done
  done
done
finish
