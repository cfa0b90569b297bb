#!/usr/bin/env bash
# Builds the SeaweedFS server binary `weed` (an S3-compatible object store: `weed server -s3`) from
# its Go module into a cache folder keyed by this module's content, and prints that folder. A second
# run with the same go.mod/go.sum/tools.go/build.sh rebuilds nothing.
#
#   KUBETUNE_CACHE   cache root (default ~/.cache/kubetune)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/tools.go" "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache_root/seaweedfs/$key"
if [[ -x "$out/bin/weed" ]]; then
  echo "$out/bin"
  exit 0
fi

cd "$here"
version=$(go list -m -f '{{.Version}}' github.com/seaweedfs/seaweedfs)
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
start=$(date +%s)
# Plain `go build` flags (no -trimpath): the Go build cache of an earlier build of the same module
# versions is reused, and the link step is all that runs again.
go build -ldflags "-s -w" -o "$tmp/bin/weed" github.com/seaweedfs/seaweedfs/weed >&2
echo "built SeaweedFS $version in $(( $(date +%s) - start ))s: $(du -sh "$tmp/bin" | cut -f1)" >&2
rm -rf "$out"
mv "$tmp" "$out"
# Older builds (other keys) are dead weight: keep only this one.
find "$cache_root/seaweedfs" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$out/bin"
