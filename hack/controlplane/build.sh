#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd from Go
# modules into a cache folder keyed by this module's content, and prints that
# folder. A second run with the same go.mod/go.sum/build.sh rebuilds nothing.
#
#   KUBETUNE_CACHE   cache root (default ~/.cache/kubetune)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache_root/controlplane/$key"
if [[ -x "$out/bin/kube-apiserver" && -x "$out/bin/kube-controller-manager" \
      && -x "$out/bin/kubectl" && -x "$out/bin/etcd" ]]; then
  echo "$out/bin"
  exit 0
fi

cd "$here"
k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
[[ $k8s_version == v1.* ]] || { echo "cannot read the k8s.io/kubernetes version from go.mod" >&2; exit 1; }
major=${k8s_version#v}; major=${major%%.*}
minor=${k8s_version#v*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X '$pkg.gitVersion=$k8s_version' -X '$pkg.gitMajor=$major' -X '$pkg.gitMinor=$minor'"
  ldflags+=" -X '$pkg.gitTreeState=clean' -X '$pkg.buildDate=1970-01-01T00:00:00Z'"
done

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp/bin"
start=$(date +%s)
# The k8s binaries build without cgo upstream; etcd too.
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl >&2
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3 >&2
echo "built control plane $k8s_version in $(( $(date +%s) - start ))s: $(du -sh "$tmp/bin" | cut -f1)" >&2
rm -rf "$out"
mv "$tmp" "$out"
# Older builds (other keys) are dead weight: keep only this one.
find "$cache_root/controlplane" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$out/bin"
