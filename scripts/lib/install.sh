# Shared by scripts/test.sh and scripts/examples.sh (sourced): logging, running as root, and
# installing what a fresh Debian machine lacks, quietly unless it fails.
# The sourcing script sets SCRIPT (its name, for error messages) first.

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "${SCRIPT:-$0}" "$*" >&2; exit 1; }

# Runs a command as root: directly if we are root, through sudo if available.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
  else
    die "need root (or sudo) to run: $*"
  fi
}

# Runs a command with its output kept in a file, shown only if the command fails.
quietly() {
  local what="$1" out
  shift
  out="$(mktemp)"
  if ! "$@" >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    die "$what failed (see output above)"
  fi
  rm -f "$out"
}

# apt-get install, quietly; the package index may be stale or absent on a fresh machine, so
# it is updated once if the first attempt fails.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get is not available to install: $*"
  log "installing $* (apt-get)"
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
      >/dev/null 2>&1; then
    quietly "apt-get update" as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    quietly "apt-get install $*" \
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  fi
}
