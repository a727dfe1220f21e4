#!/usr/bin/env bash
# Prints the path of a directory holding kube-apiserver and etcd for the
# tests (internal/testkube), building them first if needed.
# Order: $KUBE_TOOLS_DIR, if it holds both; else the project-local,
# git-ignored .tools/kube/<versions>/, built there from the Go modules that
# scripts/kube/apiserver and scripts/kube/etcd pin (module proxy only).
# The first build takes minutes; later runs find the binaries and print at
# once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kube_version=v1.37.2
etcd_version=v3.7.3
dir="$root/.tools/kube/kubernetes-$kube_version-etcd-$etcd_version"

has_both() {
  [ -x "$1/kube-apiserver" ] && [ -x "$1/etcd" ]
}

if [ -n "${KUBE_TOOLS_DIR:-}" ]; then
  if has_both "$KUBE_TOOLS_DIR"; then echo "$KUBE_TOOLS_DIR"; exit 0; fi
  echo "KUBE_TOOLS_DIR=$KUBE_TOOLS_DIR does not hold executable kube-apiserver and etcd" >&2
  exit 1
fi

# Each binary is built into a temporary name and moved into place, so that an
# interrupted build never leaves a binary that looks finished.
build() { # build <module dir> <package> <binary name> [linker flags]
  local mod=$1 pkg=$2 name=$3 ldflags="-s ${4:-}" start
  [ -x "$dir/$name" ] && return 0
  echo "building $name ($pkg) into ${dir#"$root"/} ..." >&2
  start=$SECONDS
  mkdir -p "$dir"
  (cd "$root/scripts/kube/$mod" &&
    GOTOOLCHAIN=local CGO_ENABLED=0 \
      go build -trimpath -ldflags="$ldflags" -o "$dir/$name.tmp" "$pkg") >&2
  mv "$dir/$name.tmp" "$dir/$name"
  echo "built $name in $((SECONDS - start))s" >&2
}

# The version that Kubernetes' own build stamps in, which /version reports.
v=k8s.io/component-base/version
minor=${kube_version#v1.}; minor=${minor%%.*}
build apiserver k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver \
  "-X $v.gitVersion=$kube_version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
build etcd go.etcd.io/etcd/server/v3 etcd

if ! has_both "$dir"; then
  echo "built, but $dir does not hold executable kube-apiserver and etcd" >&2
  exit 1
fi
echo "$dir"
