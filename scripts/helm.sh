#!/usr/bin/env bash
# Prints the path of a Helm v4.3.2 binary, building one first if needed.
# Order: $HELM_BIN (must be v4.3.2), a `helm` on PATH that is v4.3.2, else
# Helm built from its Go module (helm.sh/helm/v4, which the Go module proxy
# serves) into the project-local, git-ignored .tools/ folder (no system-wide
# install). The first build downloads Helm's dependencies and takes minutes;
# later calls return at once.
set -euo pipefail
want=v4.3.2
go=${GO:-go}
root=$(cd "$(dirname "$0")/.." && pwd)
gobin="$root/.tools/helm/$want"
bin="$gobin/helm"

# A release binary reports its full version (v4.3.2+g<commit>). A plain
# `go install` reports only what Helm's source says (v4.3), so the module
# version the Go toolchain recorded in the binary counts too. Output is read
# whole before grep looks at it: with pipefail, grep -q exiting early could
# fail the pipe with SIGPIPE.
is_wanted() {
  local v
  [ -x "$1" ] || return 1
  v=$("$1" version --template '{{.Version}}' 2>/dev/null) || return 1
  if [[ $v == "$want" || $v == "$want+"* ]]; then return 0; fi
  v=$("$go" version -m "$1" 2>/dev/null) || return 1
  grep -qE "^[[:space:]]+mod[[:space:]]+helm\.sh/helm/v4[[:space:]]+${want//./\\.}[[:space:]]" <<<"$v"
}

if [ -n "${HELM_BIN:-}" ]; then
  if is_wanted "$HELM_BIN"; then echo "$HELM_BIN"; exit 0; fi
  echo "HELM_BIN=$HELM_BIN is not a Helm $want binary" >&2
  exit 1
fi
if p=$(command -v helm 2>/dev/null) && is_wanted "$p"; then echo "$p"; exit 0; fi
if ! is_wanted "$bin"; then
  echo "building helm $want into .tools/ (the first time takes minutes) ..." >&2
  # The version is stamped in so that `helm version` tells the patch release.
  GOBIN="$gobin" "$go" install -ldflags "-X helm.sh/helm/v4/internal/version.version=$want" \
    "helm.sh/helm/v4/cmd/helm@$want" >&2
fi
if ! is_wanted "$bin"; then
  echo "helm $want built, but $bin is not a working Helm $want" >&2
  exit 1
fi
echo "$bin"
