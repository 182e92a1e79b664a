#!/usr/bin/env bash
# Runs the publisher examples (examples/java, examples/python, examples/node) against the
# real server and checks, with an SSE reader, that each one's events reached the browser side;
# then the authorizer examples (examples/python/authorizer.py, examples/java/.../
# AuthorizerExample.java, both Connect/JSON): ssegate, started with --authorizer-addr pointing
# at each, must open alice's stream for her session cookie and deliver an event published to
# her, and refuse a wrong cookie and none with 401.
# Run from anywhere:
#
#   [SSEGATE_BIN=target/debug/ssegate] ./scripts/examples.sh
#
# SSEGATE_BIN is the server binary (default target/debug/ssegate, which `cargo test` builds).
# It is started on 127.0.0.1 with ports chosen by the kernel (port 0; the addresses are read
# from its `ssegate serving` log line), a publisher API key and --insecure-dev-identity, so
# the reader subscribes with `?user=`. Each example publishes to a user of its own; the
# reader (examples/sse_check.py) must see exactly the events that example reports, with the
# same ids, once each, in order.
#
# Installs what is missing, idempotently and quietly (output shown only on failure):
#   - Java: Debian's libgrpc-java, libprotobuf-java, protobuf-compiler,
#     protobuf-compiler-grpc-java-plugin, libnetty-java, libperfmark-java (apt, as root or
#     through sudo -n), and a JDK if javac is missing;
#   - Python: grpcio and grpcio-tools (examples/python/requirements.txt) in a venv at
#     target/examples/venv;
#   - Node: `npm ci` in examples/node.
# Every wait has a deadline; the server and readers are stopped on exit. Logs and build
# output go to target/examples/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SSEGATE_BIN="${SSEGATE_BIN:-target/debug/ssegate}"
WORK=target/examples
API_KEY="examples-publisher-key-$$-0123456789"

SCRIPT=scripts/examples.sh
# shellcheck source=scripts/lib/install.sh
source scripts/lib/install.sh

# Polls `$@` every 50 ms until it succeeds; fails after $1 seconds.
wait_for() {
  local seconds="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what"
    sleep 0.05
  done
}

ensure_java() {
  local missing=()
  [ -x /usr/bin/grpc_java_plugin ] || missing+=(protobuf-compiler-grpc-java-plugin)
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  [ -f /usr/share/java/grpc-netty.jar ] || missing+=(libgrpc-java)
  [ -f /usr/share/java/protobuf.jar ] || missing+=(libprotobuf-java)
  [ -f /usr/share/java/netty-codec-http2.jar ] || missing+=(libnetty-java)
  [ -f /usr/share/java/perfmark-api.jar ] || missing+=(libperfmark-java)
  command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
  fi
}

ensure_python() {
  ensure_venv "$WORK/venv" examples/python/requirements.txt "grpcio and grpcio-tools"
}

ensure_node() {
  ensure_npm_ci examples/node "@grpc/grpc-js and @grpc/proto-loader"
}

server_pid=""
reader_pids=()
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while kill -0 "$server_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
cleanup() {
  local pid
  for pid in "${reader_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  reader_pids=()
  stop_server
}
trap cleanup EXIT

server_alive() {
  kill -0 "$server_pid" 2>/dev/null || { tail -n 20 "$WORK/server.log" >&2; die "the server exited"; }
}
server_announced() { server_alive && grep -q '"ssegate serving"' "$WORK/server.log"; }
server_ready() { server_alive && curl -fsS -o /dev/null "http://$ADMIN_ADDR/readyz"; }

# The bound address of one port, from the server's JSON `ssegate serving` log line.
bound_addr() {
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    if "\"ssegate serving\"" in line:
        print(json.loads(line)[sys.argv[2]]); break' "$WORK/server.log" "$1"
}

# start_server [keyless | authorizer URL]: with the publisher API key $API_KEY, or (keyless)
# with --insecure-open-publish, for the examples run without SSEGATE_API_KEY; subscribers
# with --insecure-dev-identity (`?user=`), or (authorizer) as the Connect/JSON authorizer at
# URL says, from the SESSION cookie.
start_server() {
  [ -x "$SSEGATE_BIN" ] || die "no server binary at $SSEGATE_BIN (run cargo build, or set SSEGATE_BIN)"
  local auth=(--publisher-api-keys "$API_KEY") identity=(--insecure-dev-identity)
  [ "${1:-}" = keyless ] && auth=(--insecure-open-publish)
  if [ "${1:-}" = authorizer ]; then
    identity=(--authorizer-addr "$2" --authorizer-protocol connect --authorizer-cookie SESSION)
  fi
  "$SSEGATE_BIN" serve \
    --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    "${auth[@]}" "${identity[@]}" \
    --log-format json --shutdown-grace 2s >"$WORK/server.log" 2>&1 &
  server_pid=$!
  wait_for 20 "the server's 'ssegate serving' log line" server_announced
  HTTP_ADDR="$(bound_addr http)"
  GRPC_ADDR="$(bound_addr grpc)"
  ADMIN_ADDR="$(bound_addr admin)"
  wait_for 20 "http://$ADMIN_ADDR/readyz" server_ready
}

# Runs one example against the server and checks what its user's SSE stream received.
#   $1 name, $2 time limit (seconds), then the command. KEY: the SSEGATE_API_KEY it gets.
check_example() {
  local name="$1" limit="$2"
  shift 2
  local user="examples-$name" events="$WORK/$name.events" out="$WORK/$name.out" started=$SECONDS
  python3 examples/sse_check.py read "http://$HTTP_ADDR/v1/events?user=$user" >"$events" 2>&1 &
  reader_pids+=("$!")
  # The event goes only to connections open when it is published: wait for the stream.
  wait_for 10 "the SSE stream of $user to open" grep -q '^{"open"' "$events"
  if ! env SSEGATE_GRPC_URL="http://$GRPC_ADDR" SSEGATE_API_KEY="${KEY-$API_KEY}" SSEGATE_USER="$user" \
      timeout --kill-after=5 "$limit" "$@" >"$out" 2>&1; then
    sed 's/^/    /' "$out" >&2
    die "the $name example failed (output above)"
  fi
  sed 's/^/    /' "$out" >&2
  python3 examples/sse_check.py expect "$events" "$out" "$user" --timeout 10 \
    || die "the $name example's events did not all reach $user's stream"
  log "$name: every event delivered to $user, once, in order ($((SECONDS - started))s)"
}

# Runs one authorizer example ($1 name, then its command, given AUTHORIZER_ADDR=127.0.0.1:0;
# it prints `listening on URL`), starts the server asking it, and checks that alice's session
# cookie opens her stream and gets an event published to her, and that a wrong cookie and no
# cookie get 401 with a reason.
check_authorizer() {
  local name="$1"
  shift
  local out="$WORK/$name.out" events="$WORK/$name.events" started=$SECONDS url status cookie
  # Emptied first: the background jobs' redirections happen later, and what an earlier run
  # left there must not be read as this run's.
  : >"$out"
  : >"$events"
  env AUTHORIZER_ADDR=127.0.0.1:0 "$@" >"$out" 2>&1 &
  reader_pids+=("$!")
  wait_for 60 "the $name authorizer's 'listening on' line" grep -q '^listening on http://' "$out"
  url="$(sed -n 's/^listening on //p' "$out" | head -n 1)"
  stop_server
  start_server authorizer "$url"
  python3 examples/sse_check.py read "http://$HTTP_ADDR/v1/events" --header "Cookie: SESSION=s3cr3t-alice" \
    >"$events" 2>&1 &
  reader_pids+=("$!")
  wait_for 10 "alice's stream (authorized by $name) to open" grep -q '^{"open"' "$events"
  "$SSEGATE_BIN" publish --grpc-url "http://$GRPC_ADDR" --api-key "$API_KEY" --user alice \
    --event greeting --data "hello alice, via $name" >/dev/null
  wait_for 10 "the event published to alice to reach her stream" grep -q "hello alice, via $name" "$events"
  for cookie in "SESSION=not-a-session" ""; do
    status="$(curl -sS -o "$WORK/$name.refused" -w '%{http_code}' --max-time 10 -H "Cookie: $cookie" \
      "http://$HTTP_ADDR/v1/events")"
    if [ "$status" != 401 ]; then
      sed 's/^/    /' "$out" >&2
      die "$name: the cookie '$cookie' got HTTP $status ($(head -c 200 "$WORK/$name.refused")), expected 401"
    fi
  done
  log "$name: alice's session opened her stream and got her event; a wrong cookie and none got 401 ($((SECONDS - started))s)"
}

main() {
  mkdir -p "$WORK"
  local started=$SECONDS
  command -v python3 >/dev/null 2>&1 || die "python3 is not installed (the SSE reader needs it)"
  command -v curl >/dev/null 2>&1 || die "curl is not installed"
  ensure_java
  ensure_python
  ensure_node
  start_server
  log "server $SSEGATE_BIN: http $HTTP_ADDR, grpc $GRPC_ADDR, admin $ADMIN_ADDR"

  log "java (examples/java/run.sh)"
  check_example java 180 examples/java/run.sh
  log "python (examples/python/publish.py)"
  check_example python 60 "$WORK/venv/bin/python" examples/python/publish.py
  log "node (examples/node/publish.mjs)"
  check_example node 60 node examples/node/publish.mjs

  # Without a key, against a server that lets anyone publish (development): no header sent.
  cleanup
  start_server keyless
  log "keyless server: http $HTTP_ADDR, grpc $GRPC_ADDR"
  KEY="" check_example java-keyless 180 examples/java/run.sh
  KEY="" check_example python-keyless 60 "$WORK/venv/bin/python" examples/python/publish.py
  KEY="" check_example node-keyless 60 node examples/node/publish.mjs
  log "all publisher examples passed in $((SECONDS - started))s"

  cleanup
  log "python authorizer (examples/python/authorizer.py)"
  check_authorizer python-authorizer python3 examples/python/authorizer.py
  log "java authorizer (examples/java/.../AuthorizerExample.java, JDK only)"
  check_authorizer java-authorizer java examples/java/src/main/java/io/ssegate/example/AuthorizerExample.java
  log "all examples passed in $((SECONDS - started))s"
}

main
