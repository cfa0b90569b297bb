#!/usr/bin/env bash
# Builds the helm CLI from Go modules into a cache folder keyed by this
# module's content, and prints that folder. A second run with the same
# go.mod/go.sum/build.sh rebuilds nothing.
#
#   KUBETUNE_CACHE   cache root (default ~/.cache/kubetune)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache_root/helm/$key"
if [[ -x "$out/bin/helm" ]]; then
  echo "$out/bin"
  exit 0
fi

cd "$here"
helm_version=$(go list -m -f '{{.Version}}' helm.sh/helm/v4)
[[ $helm_version == v4.* ]] || { echo "cannot read the helm.sh/helm/v4 version from go.mod" >&2; exit 1; }
# What helm's own Makefile sets for a tagged release; `helm version` reports it.
pkg=helm.sh/helm/v4/internal/version
ldflags="-s -w -X '$pkg.version=$helm_version' -X '$pkg.metadata=' -X '$pkg.gitTreeState=clean'"

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
start=$(date +%s)
# Helm's release binaries are built without cgo.
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm >&2
echo "built helm $helm_version in $(( $(date +%s) - start ))s: $(du -sh "$tmp/bin" | cut -f1)" >&2
rm -rf "$out"
mv "$tmp" "$out"
# Older builds (other keys) are dead weight: keep only this one.
find "$cache_root/helm" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$out/bin"
