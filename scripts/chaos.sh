#!/usr/bin/env bash
# The chaos run (docs/chaos.md): a real `nats-server -js`, three `ssegate serve --backplane
# nats` replicas on loopback, browser-like SSE clients that reconnect with Last-Event-ID to
# any replica, a mixed publish load with idempotency keys and retries, and faults: SIGKILL of
# a replica, SIGSTOP/SIGCONT and restart of the broker, a rolling SIGTERM, a flood of silent
# sockets and stalled HTTP/2 streams, a reconnect storm (a replica SIGKILLed and all its
# clients back at once, at default admission flags) and the broker losing its volume (store
# deleted, started empty). Fails if any acknowledged event was lost or delivered twice to a
# client, if the storm's clients were not all admitted and back within its bound, if a publish
# after the volume loss was not delivered on every replica, or if the run could not complete.
#
#   ./scripts/chaos.sh            # full: ~15,000 connections, ~4 minutes of publishing
#   ./scripts/chaos.sh --short    # CI: 600 connections, about 80 s
#   ./scripts/chaos.sh --short --connections 1000 ...   # any `ssegate-bench chaos` flag
#
# Binaries: $SSEGATE_BIN and $SSEGATE_BENCH_BIN if set; otherwise the release build for the
# full run (built if missing or stale) and target/debug for --short (built if missing).
# Output: the summary on stderr, one JSON line on stdout, and logs, the ledger and the failing
# clients' histories under target/chaos/<profile>-<time>/ (or $CHAOS_OUT).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/chaos.sh: error: %s\n' "$*" >&2; exit 1; }

short=false
for a in "$@"; do [ "$a" = "--short" ] && short=true; done

if $short; then profile=debug; name=short; else profile=release; name=full; fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}

if [ -z "${SSEGATE_BIN:-}" ] || [ -z "${SSEGATE_BENCH_BIN:-}" ]; then
  if [ "$profile" = release ]; then
    log "building release binaries (ssegate, ssegate-bench)"
    cargo build --locked --release --quiet --workspace --bin ssegate --bin ssegate-bench
  else
    [ -x "$TARGET_DIR/debug/ssegate" ] || cargo build --locked --quiet --bin ssegate
    [ -x "$TARGET_DIR/debug/ssegate-bench" ] || cargo build --locked --quiet -p ssegate-bench
  fi
fi
SSEGATE_BIN=${SSEGATE_BIN:-$TARGET_DIR/$profile/ssegate}
SSEGATE_BENCH_BIN=${SSEGATE_BENCH_BIN:-$TARGET_DIR/$profile/ssegate-bench}
[ -x "$SSEGATE_BIN" ] || die "no ssegate binary at $SSEGATE_BIN"
[ -x "$SSEGATE_BENCH_BIN" ] || die "no ssegate-bench binary at $SSEGATE_BENCH_BIN"

if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  command -v apt-get >/dev/null 2>&1 || die "nats-server is missing and apt-get is not available"
  log "installing nats-server (apt-get install nats-server)"
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null; }
  else
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null
  fi
fi

# Every process holds at most ~7,500 client sockets plus a few thousand flood sockets; raise
# the soft descriptor limit to the hard one (20,000 on the reference box).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 8192 ] && ! $short; then
  die "the descriptor limit ($(ulimit -n)) is too low for the full run; use --short or raise it"
fi
# Best effort: room for tens of thousands of client sockets and reconnections.
sysctl -qw net.ipv4.ip_local_port_range="1024 65535" 2>/dev/null || true
sysctl -qw net.core.somaxconn=8192 2>/dev/null || true

OUT=${CHAOS_OUT:-$TARGET_DIR/chaos/$name-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

# The driver owns every child and kills them on its way out. If it was itself killed (or this
# script interrupted), the children it recorded in $OUT/pids are killed here: by pid, and only
# if that pid still runs one of our programs.
driver=
orphans=false
cleanup() {
  if [ -n "$driver" ] && kill -0 "$driver" 2>/dev/null; then
    kill -TERM "$driver" 2>/dev/null || true
    sleep 2
    orphans=true
  fi
  if $orphans && [ -f "$OUT/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] || continue
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
      case "$cmd" in
        *nats-server*"$OUT"*|*ssegate*serve*--backplane\ nats*|*ssegate-bench*chaos-worker*)
          kill -CONT "$pid" 2>/dev/null || true
          kill -KILL "$pid" 2>/dev/null || true ;;
      esac
    done <"$OUT/pids"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "chaos run ($name): $SSEGATE_BIN, $SSEGATE_BENCH_BIN, output in $OUT"
"$SSEGATE_BENCH_BIN" chaos --ssegate-bin "$SSEGATE_BIN" --out-dir "$OUT" "$@" &
driver=$!
set +e
wait "$driver"
status=$?
set -e
driver=
# 128+n: the driver died of a signal, its children may be left.
[ "$status" -ge 128 ] && orphans=true
exit "$status"
