#!/usr/bin/env bash
# Build Meridian's image with buildah; the build itself needs no network:
#   scripts/build-image.sh [--base IMAGE] [--tag NAME] [--context DIR]
#     --base     the Dockerfile's BASE (default: the Dockerfile's own); scripts/image-base.sh
#                makes one from Debian's packages where no container registry is reachable
#     --tag      the image's name (default localhost/meridian:latest)
#     --context  only write the build context to DIR (for `docker build DIR`) and stop
# The context's wheels/ holds Meridian's wheel (built here) and its dependencies as binary
# wheels, resolved by the base's own interpreter (so markers such as python_full_version match
# the image) in a throw-away container on the host network; the host's CA bundle goes with it
# for proxies that re-sign TLS.  Binary wheels only: nothing is compiled, in the image or for it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="" tag="localhost/meridian:latest" context=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --context) context="$2"; shift 2 ;;
    *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
from="$base"
[ -n "$from" ] || from="$(sed -n 's/^ARG BASE=//p' "$root/Dockerfile")"

keep=1
containers=()
cleanup() {
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  [ "$keep" = 1 ] || rm -rf "$context"
}
trap cleanup EXIT
if [ -z "$context" ]; then
  context="$(mktemp -d)"
  keep=0
fi
mkdir -p "$context/wheels" "$context/config"
cp "$root/Dockerfile" "$context/Dockerfile"
cp "$root/config/global.yaml" "$context/config/global.yaml"

# Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
source_copy="$(mktemp -d)"
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md meridian edge geodns \
  | tar -C "$source_copy" -xf -
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
  --wheel-dir "$context/wheels" "$source_copy"
rm -rf "$source_copy"

probe="$(buildah from --quiet --pull=never "$from" 2>/dev/null || buildah from --quiet "$from")"
containers+=("$probe")
run=(buildah run --isolation chroot --volume "$context/wheels:/wheels")
ca="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "$ca" ]; then
  run+=(--volume "$ca:/tmp/host-ca.crt:ro" --env PIP_CERT=/tmp/host-ca.crt)
fi
[ -n "${PIP_INDEX_URL:-}" ] && run+=(--env "PIP_INDEX_URL=$PIP_INDEX_URL")
"${run[@]}" --user 0:0 "$probe" -- sh -ec '
  python3 -m venv /tmp/resolver
  /tmp/resolver/bin/pip download --quiet --disable-pip-version-check --no-cache-dir \
    --only-binary=:all: --dest /wheels /wheels/meridian-*.whl'

if [ "$keep" = 1 ]; then
  echo "$context"
  exit 0
fi
args=(--isolation chroot --format docker --layers=false --tag "$tag" --file "$context/Dockerfile")
[ -n "$base" ] && args+=(--build-arg "BASE=$base" --pull-never)
buildah bud --quiet "${args[@]}" "$context" >/dev/null
echo "$tag"
