#!/usr/bin/env bash
# Scenario 3, unicast: 10k users (one connection each), 20k publishes/s spread over them through
# PublishStream, for 20 s (ssegate only: the peers have no bulk-ingest API to compare with).
#
#   ./scripts/bench-unicast.sh         # CONNS=10000 RATE=20000 DURATION=20s REPEATS=2
source "$(dirname "$0")/bench-common.sh"
CONNS=${CONNS:-10000}
RATE=${RATE:-20000}
DURATION=${DURATION:-20s}
REPEATS=${REPEATS:-2}
build
for rep in $(seq 1 "$REPEATS"); do
  start_server ssegate
  bench ssegate "unicast-$RATE" --connections "$CONNS" --to user --rate "$RATE" --api stream \
    --concurrency 2 --duration "$DURATION"
done
finish
