#!/usr/bin/env bash
# Build the local Debian 12 base image (Python 3.11, venv, CA certificates) for sites
# where no image registry is reachable. Needs root, debootstrap and a running dockerd.
#
#   bash docker/build-base.sh [IMAGE]        # default image name: pacs-screener/base:bookworm
#
# The Debian mirror is the one apt already uses on this machine (first URIs/deb line of
# /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list); override with MIRROR=...
# The image is rebuilt only when missing (FORCE=1 rebuilds).
set -euo pipefail

IMAGE="${1:-${BASE_IMAGE:-pacs-screener/base:bookworm}}"
SUITE="${SUITE:-bookworm}"

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-base: $IMAGE already present"
  exit 0
fi

mirror_from_apt() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$f"
  done | head -n1
  if [ -r /etc/apt/sources.list ]; then
    awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
      /etc/apt/sources.list
  fi
}
MIRROR="${MIRROR:-$(mirror_from_apt | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

command -v debootstrap >/dev/null 2>&1 || {
  echo "build-base: debootstrap is missing (apt-get install -y debootstrap)" >&2
  exit 1
}

ROOT="$(mktemp -d /tmp/pacs-screener-base.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
echo "build-base: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || {
  tail -n 30 "$ROOT.log" >&2
  exit 1
}
rm -f "$ROOT.log"
# Same apt sources inside the image as the mirror used here; no caches in the image.
echo "deb $MIRROR $SUITE main" >"$ROOT/etc/apt/sources.list"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >/dev/null
echo "build-base: $IMAGE built"
