#!/usr/bin/env bash
# What a replica pays for events none of its connections needs (issue 26, goal 2): one fresh
# `nats-server -js` and REPLICAS ssegate replicas on the NATS backplane, all pinned to the
# server CPU; the load generators on the client CPU. Two layouts, each RATE publishes/s for
# DURATION, one user per subscriber, PublishStream (1 stream × 64 in flight):
#
#   all-on-one  CONNS subscribers on replica 0, publishing through replica 0: replicas 1..N-1
#               need none of the events.
#   spread      CONNS/REPLICAS subscribers on each replica (disjoint users), each load
#               generator publishing RATE/REPLICAS to its own replica's users: each replica
#               needs 1/REPLICAS of the events.
#
# Per replica it prints the CPU (user and system, from /proc/<pid>/stat) per event published
# in the cluster, and per event it delivered; the same for the broker. JSON lines go to
# $RESULTS.
#
#   ./scripts/bench-nats-replicas.sh        # REPLICAS=4 CONNS=1000 RATE=5000 DURATION=20s
#   TO=topic ./scripts/bench-nats-replicas.sh   # events to TOPICS (100) topics instead of users:
#                                           # all-on-one only (topic names are shared, so the
#                                           # spread layout would not be disjoint)
source "$(dirname "$0")/bench-common.sh"
REPLICAS=${REPLICAS:-4}
CONNS=${CONNS:-1000}
RATE=${RATE:-5000}
DURATION=${DURATION:-20s}
TO=${TO:-user}
TOPICS=${TOPICS:-100}
TO_FLAGS=(--to "$TO")
[ "$TO" = topic ] && TO_FLAGS+=(--topics "$TOPICS")
build

trap 'stop_replicas; cleanup' EXIT

start_replicas() {
  start_nats_replicas "$REPLICAS"
  # A topic's events get their own subject once every replica has heard the others for 3 s
  # (an older replica could be there unheard before); before that they go to every replica.
  if [ "$TO" = topic ]; then sleep 4; fi
}

# cpu PID: "user_ticks system_ticks"
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# report LAYOUT PUBLISHED DELIVERED_BY_REPLICA... with the CPU samples in BEFORE/AFTER arrays.
report() {
  local layout=$1 published=$2; shift 2
  local delivered=("$@") names=() i
  for i in $(seq 0 $((REPLICAS - 1))); do names+=("replica$i"); done
  names+=(broker)
  for i in "${!names[@]}"; do
    read -r u0 s0 <<<"${BEFORE[$i]}"; read -r u1 s1 <<<"${AFTER[$i]}"
    local user_us=$(((u1 - u0) * TICK_US)) sys_us=$(((s1 - s0) * TICK_US))
    local d=${delivered[$i]:-0}
    python3 - "$layout" "${names[$i]}" "$published" "$d" "$user_us" "$sys_us" <<'PY' | tee -a "$RESULTS"
import json, sys
layout, who, published, delivered, user_us, sys_us = sys.argv[1:]
published, delivered, user_us, sys_us = int(published), int(delivered), int(user_us), int(sys_us)
per = lambda n: round((user_us + sys_us) / n, 2) if n else None
print(json.dumps({"scenario": "nats-replicas", "layout": layout, "process": who, "published": published,
  "delivered": delivered, "cpu_user_s": user_us / 1e6, "cpu_system_s": sys_us / 1e6,
  "cpu_us_per_published": per(published), "user_us_per_published": round(user_us / published, 2) if published else None,
  "system_us_per_published": round(sys_us / published, 2) if published else None}))
PY
  done
}

sample() { local out=() p; for p in "${REPLICA_PIDS[@]}" "$NATS_PID"; do out+=("$(cpu "$p")"); done; printf '%s\n' "${out[@]}"; }


log "all-on-one: $CONNS subscribers on replica 0 of $REPLICAS, $RATE/s for $DURATION"
start_replicas
mapfile -t BEFORE < <(sample)
taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" run --label all-on-one --http-addr 127.0.0.1:18080 \
  --grpc-addr 127.0.0.1:15050 --connections "$CONNS" "${TO_FLAGS[@]}" --rate "$RATE" --api stream --concurrency 1 \
  --window 64 --duration "$DURATION" --json-only >"$SCRATCH/one.json" || FAILED_RUNS+=(all-on-one)
mapfile -t AFTER < <(sample)
published=$(field "$SCRATCH/one.json" published)
report all-on-one "$published" "$(field "$SCRATCH/one.json" delivered)"

if [ "$TO" != user ]; then
  stop_replicas
  finish
  exit 0
fi
log "spread: $((CONNS / REPLICAS)) subscribers on each of $REPLICAS replicas, $((RATE / REPLICAS))/s each"
start_replicas
mapfile -t BEFORE < <(sample)
gens=()
for i in $(seq 0 $((REPLICAS - 1))); do
  taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" run --label "spread-$i" --http-addr "127.0.0.1:1808$i" \
    --grpc-addr "127.0.0.1:1505$i" --connections $((CONNS / REPLICAS)) --first-user $((i * CONNS / REPLICAS)) \
    --source-base "127.0.$((i + 1)).10" --to user --rate $((RATE / REPLICAS)) --api stream --concurrency 1 \
    --window 64 --duration "$DURATION" --json-only >"$SCRATCH/spread$i.json" &
  gens+=($!)
done
for i in "${!gens[@]}"; do wait "${gens[$i]}" || FAILED_RUNS+=("spread-$i"); done
mapfile -t AFTER < <(sample)
published=0; delivered=()
for i in $(seq 0 $((REPLICAS - 1))); do
  published=$((published + $(field "$SCRATCH/spread$i.json" published)))
  delivered+=("$(field "$SCRATCH/spread$i.json" delivered)")
  lost=$(field "$SCRATCH/spread$i.json" lost); misrouted=$(field "$SCRATCH/spread$i.json" misrouted)
  [ "$lost" = 0 ] && [ "$misrouted" = 0 ] || { log "spread-$i: lost $lost, misrouted $misrouted"; FAILED_RUNS+=("spread-$i"); }
done
report spread "$published" "${delivered[@]}"
stop_replicas
finish
