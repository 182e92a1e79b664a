#!/usr/bin/env bash
# Shared by the scripts/bench-*.sh scenarios (source it; it does nothing on its own).
#
# Builds the release binaries, starts each server under test pinned to CPU 0 and the load
# generator pinned to CPU 1 (this box has 2 cores), appends every run's JSON line to
# $RESULTS, and stops whatever it started on exit.
#
# Environment:
#   CARGO_TARGET_DIR  where to build (default: target)
#   SERVER_CPU / CLIENT_CPU  taskset CPU lists (default 0 / 1)
#   RESULTS           JSON-lines file (default: $CARGO_TARGET_DIR/bench-results/<scenario>.jsonl)
#   TARGETS           which servers to run (default: "ssegate nchan baseline"; also "bare":
#                     the baseline binary with --bare, a tokio task per socket, idle only)
#   BACKPLANE         ssegate's backplane: memory (default) or nats (a fresh `nats-server -js`
#                     on 127.0.0.1:14222, pinned to the server CPU too, is started with it)
#   SSEGATE_BIN       the ssegate binary to run (default: the release build; e.g. an older
#                     build, to measure before and after a change in one run)
#   CONNECT_CONCURRENCY  the load generator's connection attempts in flight per worker
#                     (`--connect-concurrency`, default 256); 0 opens every connection at once,
#                     a reconnect storm: e.g. `CONNECT_CONCURRENCY=0 ./scripts/bench-idle.sh`
#
# A run that could not open every connection (`ssegate-bench run` exits non-zero: its report
# says how many were refused or closed without a response) does not stop the scenario; the
# script says which runs failed and exits non-zero at the end (`finish`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET_DIR=${CARGO_TARGET_DIR:-target}
export CARGO_TARGET_DIR=$TARGET_DIR
BIN=$TARGET_DIR/release
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
TARGETS=${TARGETS:-"ssegate nchan baseline"}
SSEGATE_HTTP=127.0.0.1:18080
SSEGATE_GRPC=127.0.0.1:15051
SSEGATE_ADMIN=127.0.0.1:19090
NCHAN_HTTP=127.0.0.1:18090
BASELINE_HTTP=127.0.0.1:18091
SCENARIO=${SCENARIO:-$(basename "$0" .sh)}
RESULTS=${RESULTS:-$TARGET_DIR/bench-results/$SCENARIO.jsonl}
SERVER_PID=
NATS_PID=
BACKPLANE=${BACKPLANE:-memory}
NATS_URL=nats://127.0.0.1:14222
SCRATCH=$(mktemp -d)
# Source addresses rotate between runs so TIME_WAIT sockets of a previous run never matter.
RUN_NO=0
CONNECT_CONCURRENCY=${CONNECT_CONCURRENCY:-}
FAILED_RUNS=()

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "$0" "$*" >&2; exit 1; }

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
  if [ -n "$NATS_PID" ]; then
    kill -TERM "$NATS_PID" 2>/dev/null || true
    wait "$NATS_PID" 2>/dev/null || true
    NATS_PID=
  fi
}

# Several ssegate replicas on one fresh nats-server (the NATS scenarios). Replica i listens on
# 1808i (SSE), 1505i (gRPC), 1909i (admin); its log is $SCRATCH/replica<i>.log.
REPLICA_PIDS=()
stop_replicas() {
  stop_pids "${REPLICA_PIDS[@]}"
  REPLICA_PIDS=()
}
# start_nats_replicas COUNT [FLAG...]: stops what ran, starts the broker and COUNT replicas
# (with the extra flags), and waits for their ports.
start_nats_replicas() {
  local count=$1 i; shift
  stop_replicas
  stop_server
  start_nats
  for i in $(seq 0 $((count - 1))); do
    RUST_LOG=warn taskset -c "$SERVER_CPU" "${SSEGATE_BIN:-$BIN/ssegate}" serve --http-addr "127.0.0.1:1808$i" \
      --grpc-addr "127.0.0.1:1505$i" --admin-addr "127.0.0.1:1909$i" --insecure-dev-identity \
      --insecure-open-publish --backplane nats --nats-url "$NATS_URL" "$@" >"$SCRATCH/replica$i.log" 2>&1 &
    REPLICA_PIDS+=($!)
  done
  for i in $(seq 0 $((count - 1))); do wait_port "127.0.0.1:1808$i"; wait_port "127.0.0.1:1505$i"; done
}

# A 3-node JetStream cluster (bench-nats-cluster.sh, bench-nats-partitions.sh); its nodes' pids.
NODE_PIDS=()

stop_cluster() {
  stop_pids "${NODE_PIDS[@]}"
  NODE_PIDS=()
}
# start_cluster: three fresh nodes n0..n2 (client ports 14222-14224, routes 16222-16224,
# monitoring 18222-18224), returning once JetStream has a meta leader seen by every node.
start_cluster() {
  stop_cluster
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null \
    || die "cannot install nats-server"
  local server routes="nats://127.0.0.1:16222,nats://127.0.0.1:16223,nats://127.0.0.1:16224"
  server=$(command -v nats-server || echo /usr/sbin/nats-server)
  for i in 0 1 2; do
    rm -rf "$SCRATCH/n$i"
    # The tag lets `raw-nats --place-on` put a stream on this node (R1 leaders spread).
    printf 'server_tags: ["n%s"]\n' "$i" >"$SCRATCH/n$i.conf"
    taskset -c "$SERVER_CPU" "$server" -c "$SCRATCH/n$i.conf" -js -a 127.0.0.1 -p $((14222 + i)) \
      -m $((18222 + i)) --name "n$i" --cluster_name ssegate-bench --cluster "nats://127.0.0.1:$((16222 + i))" \
      --routes "$routes" -sd "$SCRATCH/n$i" >"$SCRATCH/n$i.log" 2>&1 &
    NODE_PIDS+=($!)
  done
  for i in 0 1 2; do
    local ok=
    for _ in $(seq 1 300); do
      if curl -fsS "http://127.0.0.1:$((18222 + i))/jsz" 2>/dev/null \
        | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("meta_cluster",{}).get("leader") else 1)'; then
        ok=1; break
      fi
      sleep 0.1
    done
    [ -n "$ok" ] || die "node n$i saw no JetStream meta leader within 30 s (log: $SCRATCH/n$i.log)"
  done
}

# field FILE KEY: a value from the last JSON line of a load generator's output.
field() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])[sys.argv[2]])" "$1" "$2"; }

# stop_pids PID...: stops background processes a scenario started itself (TERM, then waits).
stop_pids() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# start_nats: a fresh JetStream server (empty store) for the nats backplane.
start_nats() {
  command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null \
    || die "cannot install nats-server"
  rm -rf "$SCRATCH/nats"
  taskset -c "$SERVER_CPU" "$(command -v nats-server || echo /usr/sbin/nats-server)" -js -a 127.0.0.1 -p 14222 \
    -sd "$SCRATCH/nats" >"$SCRATCH/nats.log" 2>&1 &
  NATS_PID=$!; wait_port 127.0.0.1:14222
}
cleanup() { stop_server; rm -rf "$SCRATCH"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

build() {
  log "building release binaries in $TARGET_DIR"
  cargo build --release --quiet --workspace --bin ssegate --bin ssegate-bench --example bench-baseline
  mkdir -p "$(dirname "$RESULTS")"
  # Wider ephemeral port range for tens of thousands of client sockets (best effort).
  sysctl -qw net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
  sysctl -qw net.core.somaxconn=8192 2>/dev/null || true
}

ensure_nchan() {
  [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] && command -v nginx >/dev/null && return 0
  log "installing nginx-light + libnginx-mod-nchan"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan >/dev/null \
    || die "cannot install nginx + nchan (apt-get install -y nginx-light libnginx-mod-nchan)"
}

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listening on $1"
}

# start_server TARGET [extra server flags...]: starts a fresh server pinned to SERVER_CPU.
start_server() {
  local target=$1; shift
  stop_server
  case $target in
    ssegate)
      local backplane=()
      if [ "$BACKPLANE" = nats ]; then
        start_nats
        backplane=(--backplane nats --nats-url "$NATS_URL")
      fi
      # Development identity and open publishing: the bench measures delivery, not JWT
      # verification (paid once per connection) or API-key checks (one map lookup per call).
      RUST_LOG=warn taskset -c "$SERVER_CPU" "${SSEGATE_BIN:-$BIN/ssegate}" serve --http-addr "$SSEGATE_HTTP" \
        --grpc-addr "$SSEGATE_GRPC" --admin-addr "$SSEGATE_ADMIN" --insecure-dev-identity \
        --insecure-open-publish "${backplane[@]}" "$@" >"$SCRATCH/ssegate.log" 2>&1 &
      SERVER_PID=$!; wait_port "$SSEGATE_HTTP"; wait_port "$SSEGATE_GRPC" ;;
    nchan)
      ensure_nchan
      mkdir -p "$SCRATCH/nginx/logs"
      cat >"$SCRATCH/nginx/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $SCRATCH/nginx/nginx.pid;
error_log $SCRATCH/nginx/logs/error.log warn;
events { worker_connections 20000; multi_accept on; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $SCRATCH/nginx/body;
  nchan_shared_memory_size 256m;
  server {
    listen $NCHAN_HTTP backlog=8192;
    location ~ ^/sub/(.+)\$ {
      nchan_subscriber eventsource;
      nchan_channel_id \$1;
      nchan_subscriber_first_message newest;
      nchan_eventsource_ping_interval 15;
    }
    location ~ ^/pub/(.+)\$ {
      nchan_publisher;
      nchan_channel_id \$1;
      nchan_message_buffer_length 16;
      nchan_message_timeout 60s;
    }
  }
}
CONF
      taskset -c "$SERVER_CPU" nginx -p "$SCRATCH/nginx" -c "$SCRATCH/nginx/nginx.conf" \
        >"$SCRATCH/nginx/logs/stdout.log" 2>&1 &
      SERVER_PID=$!; wait_port "$NCHAN_HTTP" ;;
    baseline|bare)
      local bare=()
      [ "$target" = bare ] && bare=(--bare)
      taskset -c "$SERVER_CPU" "$BIN/examples/bench-baseline" --addr "$BASELINE_HTTP" "${bare[@]}" "$@" \
        >"$SCRATCH/baseline.log" 2>&1 &
      SERVER_PID=$!; wait_port "$BASELINE_HTTP" ;;
    *) die "unknown target $target" ;;
  esac
  sleep 1
}

# bench TARGET LABEL [ssegate-bench run flags...]: one run against the running server.
bench() {
  local target=$1 label=$2; shift 2
  if [ "$BACKPLANE" = nats ] && [ "$target" = ssegate ]; then label="$label-nats"; fi
  local http
  case $target in
    ssegate) http=$SSEGATE_HTTP ;; nchan) http=$NCHAN_HTTP ;; baseline|bare) http=$BASELINE_HTTP ;;
  esac
  # The bench client speaks to the bare floor as to the baseline (same paths).
  if [ "$target" = bare ]; then label="$label-bare"; target=baseline; fi
  RUN_NO=$((RUN_NO + 1))
  local concurrency=()
  [ -n "$CONNECT_CONCURRENCY" ] && concurrency=(--connect-concurrency "$CONNECT_CONCURRENCY")
  log "$label ($target)${CONNECT_CONCURRENCY:+, connect concurrency $CONNECT_CONCURRENCY}"
  if ! taskset -c "$CLIENT_CPU" "$BIN/ssegate-bench" run --target "$target" --label "$label" \
    --http-addr "$http" --grpc-addr "$SSEGATE_GRPC" --server-pid "$SERVER_PID" \
    --source-base "127.0.$((RUN_NO % 250 + 1)).10" "${concurrency[@]}" "$@" | tee -a "$RESULTS"; then
    FAILED_RUNS+=("$label ($target)")
    log "FAILED: $label ($target) (see its report above); going on with the next run"
  fi
}

# finish: the end of a scenario: its results file, and a non-zero exit if any run failed.
finish() {
  stop_server
  log "results: $RESULTS"
  if [ "${#FAILED_RUNS[@]}" -gt 0 ]; then
    log "runs that failed (e.g. connections not admitted): ${FAILED_RUNS[*]}"
    exit 1
  fi
}
