#!/usr/bin/env bash
# Scenario 2, fan-out: one topic, 10k subscribers, publish 100/s and 1000/s for 20 s, against
# ssegate (gRPC PublishTopic), nginx+Nchan and the baseline (HTTP POST to the channel);
# reports deliveries/s, publish→receive latency, loss and duplicates.
#
#   ./scripts/bench-fanout.sh          # CONNS=10000 RATES="100 1000" DURATION=20s REPEATS=2
#   CONNECT_CONCURRENCY=0 ./scripts/bench-fanout.sh   # the subscribers connect all at once
#
# Each run reports how many connections were answered 200 and how the others failed; a run
# that did not get all of them fails (see bench-common.sh).
source "$(dirname "$0")/bench-common.sh"
CONNS=${CONNS:-10000}
RATES=${RATES:-"100 1000"}
DURATION=${DURATION:-20s}
REPEATS=${REPEATS:-2}
build
for rate in $RATES; do
  for rep in $(seq 1 "$REPEATS"); do
    for target in $TARGETS; do
      start_server "$target"
      bench "$target" "fanout-$rate" --connections "$CONNS" --topics 1 --to topic --rate "$rate" \
        --duration "$DURATION"
    done
  done
done
finish
