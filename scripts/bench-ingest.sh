#!/usr/bin/env bash
# Scenario 4, ingest: the highest publish rate with 1k subscribers (one user each), through
# unary Publish (64 calls in flight) and through PublishStream (4 streams, 1024 in flight each),
# 10 s each (ssegate only).
#
#   ./scripts/bench-ingest.sh          # CONNS=1000 DURATION=10s REPEATS=2
source "$(dirname "$0")/bench-common.sh"
CONNS=${CONNS:-1000}
DURATION=${DURATION:-10s}
REPEATS=${REPEATS:-2}
build
for rep in $(seq 1 "$REPEATS"); do
  start_server ssegate
  bench ssegate ingest-unary --connections "$CONNS" --to user --rate max --api unary --concurrency 64 \
    --duration "$DURATION"
  start_server ssegate
  bench ssegate ingest-stream --connections "$CONNS" --to user --rate max --api stream --concurrency 4 \
    --window 1024 --duration "$DURATION"
done
finish
