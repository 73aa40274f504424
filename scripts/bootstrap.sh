# Sourced by scripts/serve and scripts/test: everything a fresh machine needs, done once.
#  - a virtual environment in .venv with the client and server packages and the server's extras (re-installed
#    when either pyproject.toml changes)
#  - redis-server, from the OS packages when it is missing (apt-get, as root or with sudo)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LSTM_SERVE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

ensure_venv() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"' || exit 2
    say "creating a virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # Both distributions: the client (clients/python: generated code and client library, no TensorFlow)
  # and the server, which depends on it. A change to either pyproject.toml reinstalls.
  local stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
  if [ ! -f "$stamp" ]; then
    say "installing the packages and their dependencies ($extras) - the first time takes a few minutes"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT/clients/python" -e "$ROOT[$extras]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    say "redis-server is missing: installing it from the OS packages"
    $sudo apt-get update -qq >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # The package starts a system Redis on 6379; that one is fine to keep, the tests use their own ports.
  elif command -v brew >/dev/null 2>&1; then
    say "redis-server is missing: installing it with Homebrew"
    brew install redis
  fi
  command -v redis-server >/dev/null 2>&1 || { say "could not install redis-server; install Redis and run again"; exit 2; }
}
