#!/usr/bin/env bash
# A base image for Meridian's Dockerfile made from Debian's packages alone, for machines that
# reach Debian's archive but no container registry (CI here):
#   debootstrap --variant=minbase bookworm + python3 + python3-venv, docs and apt lists removed,
#   committed with buildah as $MERIDIAN_BASE_IMAGE (default localhost/meridian-base:bookworm).
# Cached twice, keyed by the recipe below: the image in buildah's storage, and the root
# filesystem's tarball in $MERIDIAN_BASE_CACHE (default /var/cache/meridian-test-base), so a
# machine pays debootstrap (about 40 s) once.  Prints the image name.  Needs root, debootstrap
# and buildah (Debian packages).
set -euo pipefail

image="${MERIDIAN_BASE_IMAGE:-localhost/meridian-base:bookworm}"
cache="${MERIDIAN_BASE_CACHE:-/var/cache/meridian-test-base}"
mirror="${MERIDIAN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages=python3,python3-venv
# Change the recipe, change the key: both caches are then rebuilt.
recipe="v1 $suite minbase $packages"
key="$(printf '%s' "$recipe" | sha256sum | cut -c1-16)"
tarball="$cache/rootfs-$key.tar"

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9   # one build at a time per machine

if [ "$(buildah inspect --type image --format '{{index .Docker.Config.Labels "org.meridian.base.recipe"}}' "$image" 2>/dev/null || true)" = "$key" ]; then
  echo "$image"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  work="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  # What an image does not need: package caches and lists, documentation, translations.
  rm -rf "$work/root/var/cache/apt/"* "$work/root/var/lib/apt/lists/"* \
    "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/info/"* \
    "$work/root/usr/share/locale/"* "$work/root/var/log/"*
  tar --numeric-owner --xattrs -C "$work/root" -cf "$tarball.new" .
  mv "$tarball.new" "$tarball"
  rm -rf "$work"
fi

container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$container" "$tarball" / >/dev/null
buildah config --label "org.meridian.base.recipe=$key" \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd /bin/bash "$container"
buildah commit --quiet --format docker "$container" "$image" >/dev/null
echo "$image"
