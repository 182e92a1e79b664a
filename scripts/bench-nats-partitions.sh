#!/usr/bin/env bash
# Partitioned streams through ssegate (issue 26, goal 3): a fresh 3-node JetStream cluster,
# three ssegate replicas (replica i connected to node i, R3 streams), and three load
# generators, each with its own CONNS/3 subscribers (one user each, disjoint users) on its own
# replica, publishing to them through that replica as fast as they are acknowledged
# (PublishStream, 1 stream × WINDOW in flight) for DURATION; once with --nats-partitions 1 (one
# stream: one leader takes every event) and once with 3. Beside them, in the same run,
# `ssegate-bench raw-nats` on a fresh cluster with 1 and 3 R3 streams: the broker's own figure.
#
#   ./scripts/bench-nats-partitions.sh      # CONNS=900 WINDOW=256 DURATION=15s REPEATS=1
#
# Every node and replica is pinned to SERVER_CPU (default CPU 0), the generators to CLIENT_CPU:
# on this 2-core box they share one core, so acknowledged publishes per second are what that
# core allowed (comparable within the run), and the figure that carries over to a cluster of
# real machines is each node's CPU per event: the busiest node's bounds what the cluster
# carries (one node's core ÷ its µs per event). Prints one JSON line per process per run
# (node, replica: CPU µs per event published in the cluster, user and system; the streams'
# leaders) and one per run (publishes/s, lost); all go to $RESULTS.
source "$(dirname "$0")/bench-common.sh"
CONNS=${CONNS:-900}
WINDOW=${WINDOW:-256}
DURATION=${DURATION:-15s}
REPEATS=${REPEATS:-1}
trap 'stop_replicas; stop_cluster; cleanup' EXIT
build

cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
sample() { local p; for p in "${NODE_PIDS[@]}" "${REPLICA_PIDS[@]}"; do cpu "$p"; done; }

# The node each stream's leader is on, as "stream=node ...".
leaders() {
  curl -fsS "http://127.0.0.1:18222/jsz?streams=true" | python3 -c '
import json, sys
j = json.load(sys.stdin)
out = []
for acc in j.get("account_details", []):
    for s in acc.get("stream_detail", []):
        out.append("%s=%s" % (s["name"], (s.get("cluster") or {}).get("leader", "?")))
print(" ".join(sorted(out)))'
}

# spread_leaders STREAM...: asks the leaders of these R3 streams to step down (a JetStream API
# request over the plain NATS protocol) until no two are on one node, at most 40 tries.
# JetStream elects R3 leaders by itself and put all three on one node in the first trial; an
# operator does the same with `nats stream cluster step-down`.
spread_leaders() {
  python3 - "$@" <<'PY'
import json, socket, sys, time, urllib.request
streams = sys.argv[1:]
def leaders():
    j = json.load(urllib.request.urlopen("http://127.0.0.1:18222/jsz?streams=true", timeout=5))
    return {s["name"]: (s.get("cluster") or {}).get("leader") for a in j.get("account_details", [])
            for s in a.get("stream_detail", []) if s["name"] in streams}
def step_down(name):
    c = socket.create_connection(("127.0.0.1", 14222), timeout=5)
    c.recv(4096)  # INFO
    c.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.sd 1\r\n'
              + b"PUB $JS.API.STREAM.LEADER.STEPDOWN.%s _INBOX.sd 0\r\n\r\n" % name.encode())
    end, got = time.time() + 5, b""
    while b"MSG _INBOX.sd" not in got and time.time() < end:
        got += c.recv(4096)
    c.close()
for _ in range(40):
    now = leaders()
    nodes = list(now.values())
    if len(now) == len(streams) and None not in nodes and len(set(nodes)) == len(nodes):
        print(" ".join("%s=%s" % kv for kv in sorted(now.items())))
        sys.exit(0)
    seen = set()
    for name, node in sorted(now.items()):
        if node in seen or node is None:
            step_down(name)
            break
        seen.add(node)
    time.sleep(1.5)
sys.exit("leaders not spread: %s" % leaders())
PY
}

# run PARTITIONS REP
run() {
  local parts=$1 rep=$2 label="partitions-$1" i
  log "$label (repeat $rep): 3 nodes, 3 replicas, $CONNS subscribers, 3 × 1 × $WINDOW in flight, $DURATION"
  stop_replicas
  start_cluster
  for i in 0 1 2; do
    RUST_LOG=warn taskset -c "$SERVER_CPU" "${SSEGATE_BIN:-$BIN/ssegate}" serve --http-addr "127.0.0.1:1808$i" \
      --grpc-addr "127.0.0.1:1505$i" --admin-addr "127.0.0.1:1909$i" --insecure-dev-identity \
      --insecure-open-publish --backplane nats --nats-url "nats://127.0.0.1:$((14222 + i))" \
      --nats-stream-replicas 3 --nats-partitions "$parts" >"$SCRATCH/replica$i.log" 2>&1 &
    REPLICA_PIDS+=($!)
    # One at a time: the first creates the streams, the others find them.
    wait_port "127.0.0.1:1808$i"; wait_port "127.0.0.1:1505$i"
  done
  if [ "$parts" -gt 1 ]; then
    local names=(SSEGATE) k
    for k in $(seq 1 $((parts - 1))); do names+=("SSEGATE-p$k"); done
    spread_leaders "${names[@]}" >/dev/null || die "could not spread the streams' leaders over the nodes"
  fi
  local where; where=$(leaders)
  log "stream leaders: $where"
  mapfile -t BEFORE < <(sample)
  local gens=()
  for i in 0 1 2; do
    taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" run --label "$label-$i" --http-addr "127.0.0.1:1808$i" \
      --grpc-addr "127.0.0.1:1505$i" --connections $((CONNS / 3)) --first-user $((i * CONNS / 3)) \
      --source-base "127.0.$((rep * 10 + i + 1)).10" --to user --rate max --api stream --concurrency 1 \
      --window "$WINDOW" --duration "$DURATION" --json-only >"$SCRATCH/gen$i.json" &
    gens+=($!)
  done
  for i in "${!gens[@]}"; do wait "${gens[$i]}" || FAILED_RUNS+=("$label-$i"); done
  mapfile -t AFTER < <(sample)
  local published=0 rate=0 lost=0
  for i in 0 1 2; do
    published=$((published + $(field "$SCRATCH/gen$i.json" published)))
    rate=$(python3 -c "print(round($rate + $(field "$SCRATCH/gen$i.json" publishes_per_s)))")
    lost=$((lost + $(field "$SCRATCH/gen$i.json" lost) + $(field "$SCRATCH/gen$i.json" misrouted)))
  done
  [ "$lost" = 0 ] || { log "$label: $lost lost or misrouted"; FAILED_RUNS+=("$label"); }
  local names=(node0 node1 node2 replica0 replica1 replica2)
  for i in "${!names[@]}"; do
    read -r u0 s0 <<<"${BEFORE[$i]}"; read -r u1 s1 <<<"${AFTER[$i]}"
    python3 - "$label" "${names[$i]}" "$published" $(((u1 - u0) * TICK_US)) $(((s1 - s0) * TICK_US)) "$where" <<'PY' | tee -a "$RESULTS"
import json, sys
label, who, published, user_us, sys_us, leaders = sys.argv[1:]
published, user_us, sys_us = int(published), int(user_us), int(sys_us)
per = lambda us: round(us / published, 2) if published else None
print(json.dumps({"scenario": "nats-partitions", "label": label, "process": who, "published": published,
  "cpu_us_per_published": per(user_us + sys_us), "user_us_per_published": per(user_us),
  "system_us_per_published": per(sys_us), "leaders": leaders}))
PY
  done
  printf '{"scenario": "nats-partitions", "label": "%s", "published": %s, "publishes_per_s": %s, "lost": %s}\n' \
    "$label" "$published" "$rate" "$lost" | tee -a "$RESULTS"
}

raw() {
  local streams=$1
  start_cluster
  log "raw-nats, $streams R3 stream(s) (the broker's own figure)"
  taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" raw-nats --label "raw-r3-$streams-streams" --publishers 6 \
    --window 512 --duration "$DURATION" --nats-url nats://127.0.0.1:14222 --streams "$streams" --replicas 3 \
    --broker-pid "${NODE_PIDS[0]}" --broker-pid "${NODE_PIDS[1]}" --broker-pid "${NODE_PIDS[2]}" \
    | tee -a "$RESULTS" || FAILED_RUNS+=("raw-$streams")
}

for rep in $(seq 1 "$REPEATS"); do
  for parts in 1 3; do run "$parts" "$rep"; done
  stop_replicas
  for streams in 1 3; do raw "$streams"; done
  stop_cluster
done
finish
