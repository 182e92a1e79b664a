#!/usr/bin/env bash
# How far out of stream order live copies reach a replica (issue 26, interest delivery): one
# fresh `nats-server -js` and 1 + PUBLISHERS ssegate replicas, all pinned to the server CPU.
# Replica 0 holds every subscriber; each of PUBLISHERS load generators (on the client CPU) opens
# CONNS streams of its own users on replica 0 and publishes RATE/s to them through replica k
# (1..PUBLISHERS), PublishStream 1 × 64. So replica 0 receives copies of events that several
# NATS connections published at once, which is where a broker may send them out of order.
#
# It prints, from replica 0's /metrics: the copies that arrived after a later one and how long
# after (`ssegate_backplane_copy_reorder_seconds`), the events applied behind a later one
# (`ssegate_backplane_late_events_total`), with the load generators' loss and latency. JSON
# lines go to $RESULTS.
#
#   ./scripts/bench-nats-order.sh     # PUBLISHERS=3 CONNS=1000 RATE=3000 DURATION=20s REPEATS=1
#   RATE=10000 DURATION=15s ./scripts/bench-nats-order.sh      # saturating this machine's server core
#   SSEGATE_ARGS="--nats-interest-linger 5s" ./scripts/bench-nats-order.sh   # extra replica flags
source "$(dirname "$0")/bench-common.sh"
PUBLISHERS=${PUBLISHERS:-3}
CONNS=${CONNS:-1000}
RATE=${RATE:-3000}
DURATION=${DURATION:-20s}
REPEATS=${REPEATS:-1}
read -r -a EXTRA <<<"${SSEGATE_ARGS:-}"
build

trap 'stop_replicas; cleanup' EXIT

for run in $(seq 1 "$REPEATS"); do
  log "run $run: $PUBLISHERS publishers × $RATE/s to $CONNS users each, all subscribers on replica 0, $DURATION"
  start_nats_replicas $((PUBLISHERS + 1)) "${EXTRA[@]}"
  gens=()
  for k in $(seq 1 "$PUBLISHERS"); do
    taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" run --label "order-$k" --http-addr 127.0.0.1:18080 \
      --grpc-addr "127.0.0.1:1505$k" --connections "$CONNS" --first-user $((k * CONNS)) \
      --source-base "127.0.$k.10" --to user --rate "$RATE" --api stream --concurrency 1 \
      --window 64 --duration "$DURATION" --json-only >"$SCRATCH/gen$k.json" &
    gens+=($!)
  done
  for i in "${!gens[@]}"; do wait "${gens[$i]}" || FAILED_RUNS+=("run$run-gen$((i + 1))"); done
  published=0; delivered=0; lost=0; p50s=(); p99s=()
  for k in $(seq 1 "$PUBLISHERS"); do
    published=$((published + $(field "$SCRATCH/gen$k.json" published)))
    delivered=$((delivered + $(field "$SCRATCH/gen$k.json" delivered)))
    lost=$((lost + $(field "$SCRATCH/gen$k.json" lost)))
    p50s+=("$(field "$SCRATCH/gen$k.json" latency_p50_ms)"); p99s+=("$(field "$SCRATCH/gen$k.json" latency_p99_ms)")
  done
  curl -fsS http://127.0.0.1:19090/metrics >"$SCRATCH/metrics.txt"
  python3 - "$run" "$published" "$delivered" "$lost" "${p50s[*]}" "${p99s[*]}" "${SSEGATE_ARGS:-}" "$SCRATCH/metrics.txt" <<'PY' | tee -a "$RESULTS"
import json, re, sys
run, published, delivered, lost, p50s, p99s, args, path = sys.argv[1:]
buckets, count, late = {}, 0, 0
for line in open(path):
    m = re.match(r'ssegate_backplane_copy_reorder_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
    if m:
        buckets[m.group(1)] = int(float(m.group(2)))
    elif line.startswith("ssegate_backplane_copy_reorder_seconds_count"):
        count = int(float(line.split()[1]))
    elif line.startswith("ssegate_backplane_late_events_total"):
        late = int(float(line.split()[1]))
# Copies that arrived at most this late (cumulative, upper bounds in ms), where any did.
within = {("+Inf" if le == "+Inf" else f"{float(le) * 1000:g}ms"): c for le, c in buckets.items() if c}
print(json.dumps({"scenario": "nats-order", "run": int(run), "args": args, "published": int(published),
  "delivered": int(delivered), "lost": int(lost), "reordered_copies": count, "reordered_within": within,
  "late_events": late, "latency_p50_ms": p50s.split(), "latency_p99_ms": p99s.split()}))
PY
  stop_replicas
done
finish
