#!/usr/bin/env bash
# Lean-egress figures (issue 11) for ssegate alone: fan-out CPU and latency by write-coalescing
# window, and the 10k x 1000/s overload run. Peers are compared by bench-idle.sh and
# bench-fanout.sh in the same session.
#
#   ./scripts/bench-egress.sh     # WINDOWS="0 5ms 20ms" SIZES="2000 10000" DURATION=20s
source "$(dirname "$0")/bench-common.sh"
WINDOWS=${WINDOWS:-"0 5ms 20ms"}
SIZES=${SIZES:-"2000 10000"}
DURATION=${DURATION:-20s}
build
for n in $SIZES; do
  for w in $WINDOWS; do
    start_server ssegate --write-coalesce "$w"
    bench ssegate "fanout-100-n$n-coalesce-$w" --connections "$n" --topics 1 --to topic --rate 100 \
      --duration "$DURATION"
  done
done
start_server ssegate
bench ssegate "fanout-1000-n10000" --connections 10000 --topics 1 --to topic --rate 1000 --duration "$DURATION"
finish
