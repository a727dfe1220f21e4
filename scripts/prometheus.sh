#!/usr/bin/env bash
# Prints the folder holding Prometheus' `prometheus` and `promtool` binaries
# (version 2.42, Debian 12's), installing them first if needed: Debian's
# prometheus package, fetched with apt-get download (no root, no system-wide
# install) and unpacked into the project-local, git-ignored .tools/ folder.
# $PROMETHEUS_DIR, when set, is used as it is.
set -euo pipefail
version=2.42.0+ds-5+deb12u1
root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.tools/prometheus/$version"

works() { [ -x "$1/promtool" ] && [ -x "$1/prometheus" ] && "$1/promtool" --version >/dev/null 2>&1; }

if [ -n "${PROMETHEUS_DIR:-}" ]; then
  if works "$PROMETHEUS_DIR"; then echo "$PROMETHEUS_DIR"; exit 0; fi
  echo "PROMETHEUS_DIR=$PROMETHEUS_DIR has no working prometheus and promtool" >&2
  exit 1
fi
if ! works "$target"; then
  echo "fetching Debian's prometheus $version into .tools/ ..." >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -q "prometheus=$version") >&2
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
  mkdir -p "$target"
  cp "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$target/"
fi
if ! works "$target"; then
  echo "prometheus $version unpacked, but $target has no working promtool" >&2
  exit 1
fi
echo "$target"
