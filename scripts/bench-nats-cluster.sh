#!/usr/bin/env bash
# The broker's side of partitioned streams (issue 26, goal 3), measured on the nats-server at
# hand: what one stream costs each node of a 3-node JetStream cluster per event, as leader and
# as follower, and what spreading the events over 3 streams changes. Beside it, in the same
# run, one `nats-server -js` alone (the figure the rest of BENCHMARKS.md uses).
#
#   ./scripts/bench-nats-cluster.sh          # DURATION=10s REPEATS=2
#
# Runs, each `ssegate-bench raw-nats` (6 publishers × 512 in flight, 100-byte events), on a
# fresh cluster:  R1 × 1 stream, R1 × 3 streams (one per node), R3 × 1 stream, R3 × 3 streams.
# The publisher connects to n0; a stream led elsewhere costs n0 the routing of its publishes.
# Every node is pinned to SERVER_CPU (default CPU 0) and the publisher to CLIENT_CPU, as in the
# other scenarios: on this 2-core box the nodes share one core, so the figure that carries over
# to a real cluster is the CPU per event on each node (leader vs follower); acknowledged
# publishes per second are the sum the shared core allowed, comparable only within the run.
source "$(dirname "$0")/bench-common.sh"
DURATION=${DURATION:-10s}
REPEATS=${REPEATS:-2}
PUBLISHERS=6
WINDOW=512
trap 'stop_cluster; cleanup' EXIT

raw() {
  local label=$1; shift
  log "$label"
  if ! taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" raw-nats --label "$label" --publishers "$PUBLISHERS" \
    --window "$WINDOW" --duration "$DURATION" "$@" | tee -a "$RESULTS"; then
    FAILED_RUNS+=("$label")
  fi
}

build
for rep in $(seq 1 "$REPEATS"); do
  start_nats
  raw "single-node-1-stream" --nats-url "$NATS_URL" --broker-pid "$NATS_PID"
  stop_server
  for replicas in 1 3; do
    for streams in 1 3; do
      start_cluster
      # R1: stream k on node k (JetStream alone put all three on one node). R3: every node
      # holds every stream; the leaders are elected, and reported.
      place=()
      [ "$replicas" = 1 ] && place=(--place-on n0,n1,n2)
      raw "cluster-r$replicas-${streams}-streams" --nats-url nats://127.0.0.1:14222 --streams "$streams" \
        --replicas "$replicas" --broker-pid "${NODE_PIDS[0]}" --broker-pid "${NODE_PIDS[1]}" \
        --broker-pid "${NODE_PIDS[2]}" "${place[@]}"
    done
  done
  stop_cluster
done
finish
