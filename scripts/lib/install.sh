# Shared by scripts/test.sh, scripts/examples.sh and scripts/client-libraries.sh (sourced): logging, running as root, and
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

# ensure_venv VENV REQUIREMENTS WHAT: a Python venv at VENV with REQUIREMENTS installed (pinned),
# made again only when the requirements file changed since (a copy is kept in the venv).
ensure_venv() {
  local venv="$1" requirements="$2" what="$3" stamp="$1/.requirements.txt"
  if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$stamp"; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is not installed"
  log "installing $what (pip, into $venv)"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  # Debian's python3 lacks the venv module until python3-venv is installed.
  python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
  quietly "python3 -m venv $venv (on Debian: apt-get install python3-venv)" python3 -m venv "$venv"
  quietly "pip install -r $requirements" \
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
}

# ensure_node_toolchain: node and npm, from Debian's packages when either is missing.
ensure_node_toolchain() {
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    return 0
  fi
  apt_install nodejs npm
  command -v node >/dev/null 2>&1 || die "nodejs was installed but node is still missing"
  command -v npm >/dev/null 2>&1 || die "npm was installed but is still missing"
}

# ensure_npm_ci DIR WHAT: `npm ci` in DIR, again only when its package-lock.json changed since.
ensure_npm_ci() {
  local dir="$1" what="$2" stamp="$1/node_modules/.ssegate-installed-lock.json"
  if cmp -s "$dir/package-lock.json" "$stamp"; then
    return 0
  fi
  ensure_node_toolchain
  log "installing $what (npm ci in $dir)"
  quietly "npm ci in $dir" bash -c "cd '$dir' && npm ci --no-audit --no-fund --loglevel=error"
  cp "$dir/package-lock.json" "$stamp"
}
