#!/usr/bin/env bash
# Builds Kueue's controller manager (`kueue`, the job queueing controller) from its Go module into a
# cache folder keyed by this module's content, and prints that folder's bin/. Next to bin/ it copies
# what a test control plane needs from the same module version: the CRDs (crds/*.yaml) and the
# webhook configurations (webhook/manifests.yaml), so that binary and manifests always match. A
# second run with the same go.mod/go.sum/tools.go/build.sh rebuilds nothing.
#
#   KUBETUNE_CACHE   cache root (default ~/.cache/kubetune)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/tools.go" "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache_root/kueue/$key"
if [[ -x "$out/bin/kueue" && -f "$out/webhook/manifests.yaml" ]]; then
  echo "$out/bin"
  exit 0
fi

cd "$here"
version=$(go list -m -f '{{.Version}}' sigs.k8s.io/kueue)
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/crds" "$tmp/webhook"
start=$(date +%s)
# Plain `go build` flags (no -trimpath): the Go build cache of an earlier build of the same module
# versions is reused, and the link step is all that runs again. The version stamp is what
# `kueue --version` and Kueue's own logs print.
go build -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" \
  -o "$tmp/bin/kueue" sigs.k8s.io/kueue/cmd/kueue >&2
# The manifests of this very module version, from the Go module cache (go build downloaded it).
src=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
cp "$src"/config/components/crd/bases/*.yaml "$tmp/crds/"
cp "$src/config/components/webhook/manifests.yaml" "$tmp/webhook/"
chmod -R u+w "$tmp"
echo "$version" > "$tmp/VERSION"
echo "built Kueue $version in $(( $(date +%s) - start ))s: $(du -sh "$tmp/bin" | cut -f1)" >&2
rm -rf "$out"
mv "$tmp" "$out"
# Older builds (other keys) are dead weight: keep only this one.
find "$cache_root/kueue" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$out/bin"
