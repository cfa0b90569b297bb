"""The Helm chart from Python: build helm, render the chart, install its RBAC into a control plane.

- :func:`helm_binary` builds helm from Go modules (``hack/helm/build.sh``, a
  content-keyed cache like the control plane's) and returns its path;
- :func:`render` runs ``helm template`` with a values mapping and returns the
  manifests as dictionaries; :func:`policy_document` picks the platform policy
  out of them (what the operator reads from ``KUBETUNE_POLICY_FILE``);
- :func:`install_operator_rbac` applies the chart's ServiceAccount and RBAC to
  a running :class:`~kubetune.dev.controlplane.ControlPlane` and returns an
  :class:`OperatorIdentity` whose kubeconfig authenticates exactly as the
  operator's ServiceAccount would in a pod, so tests can run the operator under
  the chart's permissions instead of as admin.
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "charts" / "kubetune"
HELM_BUILD_SCRIPT = REPO_ROOT / "hack" / "helm" / "build.sh"

DEFAULT_RELEASE = "kubetune"
DEFAULT_NAMESPACE = "kubetune-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
"""What :func:`install_operator_rbac` applies from the rendered chart."""

Manifest = dict[str, Any]


class ChartError(RuntimeError):
    """helm could not be built, or failed to lint or render the chart (the message has its output)."""


def helm_binary() -> Path:
    """Builds helm (or finds it in the cache) and returns the path of the binary."""
    proc = subprocess.run(["bash", str(HELM_BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ChartError(f"building helm failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "helm"


def _values_args(values: Mapping[str, Any] | None, workdir: Path) -> list[str]:
    if not values:
        return []
    path = workdir / "values.yaml"
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return ["--values", str(path)]


def _run_helm(helm: Path, args: list[str]) -> str:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ChartError(f"helm {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def lint(helm: Path, values: Mapping[str, Any] | None = None, *, chart: Path = CHART_DIR) -> str:
    """``helm lint --strict`` (warnings fail too); returns helm's report."""
    with tempfile.TemporaryDirectory() as workdir:
        return _run_helm(helm, ["lint", "--strict", str(chart), *_values_args(values, Path(workdir))])


def render(helm: Path, values: Mapping[str, Any] | None = None, *, release: str = DEFAULT_RELEASE,
           namespace: str = DEFAULT_NAMESPACE, chart: Path = CHART_DIR) -> list[Manifest]:
    """``helm template``: the chart's objects (not its CRDs) as dictionaries, in helm's order."""
    with tempfile.TemporaryDirectory() as workdir:
        out = _run_helm(helm, ["template", release, str(chart), "--namespace", namespace,
                               *_values_args(values, Path(workdir))])
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    """The manifests of `kind` (and `name`, when given)."""
    return [m for m in manifests
            if m.get("kind") == kind and (name is None or m["metadata"]["name"] == name)]


def policy_document(manifests: list[Manifest]) -> str:
    """The platform policy (``policy.yaml`` of the ``*-policy`` ConfigMap) the chart renders."""
    for config_map in find(manifests, "ConfigMap"):
        if config_map["metadata"]["name"].endswith("-policy"):
            return str(config_map["data"]["policy.yaml"])
    raise ChartError("the rendered chart has no policy ConfigMap")


@dataclasses.dataclass(frozen=True)
class OperatorIdentity:
    """The operator's ServiceAccount as the chart sets it up, and a way to act as it."""

    namespace: str
    """Namespace of the ServiceAccount (the release namespace)."""
    service_account: str
    """Name of the ServiceAccount."""
    kubeconfig: Path
    """A kubeconfig with a client certificate for ``username`` in ``groups``: the API server
    authenticates and authorizes it exactly like the ServiceAccount's token."""

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    @property
    def groups(self) -> tuple[str, str]:
        return ("system:serviceaccounts", f"system:serviceaccounts:{self.namespace}")


def install_operator_rbac(cluster: Any, helm: Path | None = None, values: Mapping[str, Any] | None = None, *,
                          release: str = DEFAULT_RELEASE, namespace: str = DEFAULT_NAMESPACE) -> OperatorIdentity:
    """Applies the chart's ServiceAccount, (Cluster)Roles and bindings to `cluster` and mints a
    kubeconfig for the operator's ServiceAccount.

    `values` are chart values (e.g. ``{"watchNamespaces": ["a"]}``; those namespaces must
    exist). The release namespace is created when missing. Applying again is harmless.
    """
    helm = helm or helm_binary()
    manifests = render(helm, values, release=release, namespace=namespace)
    accounts = find(manifests, "ServiceAccount")
    if len(accounts) != 1:
        raise ChartError(f"expected one ServiceAccount in the rendered chart, found {len(accounts)}")
    if cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", namespace)
    rbac = [m for m in manifests if m["kind"] in RBAC_KINDS]
    # --force-conflicts: the tenant ClusterRoles have fixed names, so another release of the chart
    # may have applied them already (with its own release labels).
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-chart-test",
                    "-f", "-", input=yaml.safe_dump_all(rbac, sort_keys=False))
    account = accounts[0]["metadata"]["name"]
    identity_groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}")
    kubeconfig = cluster.mint_kubeconfig(f"system:serviceaccount:{namespace}:{account}", identity_groups)
    return OperatorIdentity(namespace=namespace, service_account=account, kubeconfig=kubeconfig)
