#!/usr/bin/env bash
# Shared by scripts/demo.sh and .ci/run: make .venv (Python 3.11+) and install the project into it.
#   source scripts/bootstrap.sh EXTRAS   (EXTRAS: "" for the demo, "test" for the test suite)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "meridian needs Python 3.11 or newer (found: $("$python" --version 2>&1))" >&2
  exit 2
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {  # apt_install PACKAGE...: Debian packages, when we are allowed to
  command -v apt-get >/dev/null || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { as_root apt-get update -q >/dev/null 2>&1 && \
         as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1; }
}

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv || true   # Debian ships venv separately
    "$python" -m venv "$venv"
  fi
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
export PATH="$venv/bin:$PATH"
