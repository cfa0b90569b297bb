"""Fixtures for the chart on the real control plane: helm, the CRDs, an installed release, tenants.

The chart is installed the way `helm install` would create its objects (rendered with
`helm template`, then applied), because the control plane has no Helm release storage to
worry about and the tests care about what the objects do: admission, RBAC, aggregation.
"""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart

REPO = Path(__file__).resolve().parents[3]
CHART_CRDS = REPO / "charts" / "kubetune" / "crds"
RELEASE_NAMESPACE = "kubetune-chart-system"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.5) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def restricted_namespace(cluster: Any, name: str) -> None:
    """Creates `name` enforcing (and warning about) the `restricted` Pod Security level."""
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/warn-version": "latest"}}}))


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm binary, built from Go modules by hack/helm/build.sh (cached by content)."""
    return chart.helm_binary()


@pytest.fixture(scope="module")
def chart_crds(cluster: Any) -> None:
    """The chart's CRDs, applied by the documented upgrade path (server-side apply)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART_CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")


@dataclasses.dataclass(frozen=True)
class Release:
    """The chart installed into the control plane."""

    namespace: str
    manifests: list[dict[str, Any]]

    def name_of(self, kind: str) -> str:
        return str(chart.find(self.manifests, kind)[0]["metadata"]["name"])

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name_of('ServiceAccount')}"

    @property
    def signing_key_secret(self) -> str:
        """The Secret the operator creates for its signing key (the one name its Role may read)."""
        role = chart.find(self.manifests, "Role", f"{self.name_of('ServiceAccount')}-signing-key")[0]
        return str(next(r for r in role["rules"] if r.get("resourceNames"))["resourceNames"][0])


@pytest.fixture(scope="module")
def release(cluster: Any, helm_bin: Path, chart_crds: None) -> Iterator[Release]:
    """The chart with default values (cluster-wide), applied for real in a restricted namespace.
    Afterwards its admission-policy binding goes: it binds cluster-wide, and other modules' jobs
    (created as admin, with whatever spec they test) must not meet this module's policy."""
    restricted_namespace(cluster, RELEASE_NAMESPACE)
    manifests = chart.render(helm_bin, {"grafanaDashboard": {"enabled": True}}, namespace=RELEASE_NAMESPACE)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-",
                    input=yaml.safe_dump_all(manifests, sort_keys=False))
    yield Release(RELEASE_NAMESPACE, manifests)
    for binding in chart.find(manifests, "ValidatingAdmissionPolicyBinding"):
        cluster.kubectl("delete", "validatingadmissionpolicybinding", binding["metadata"]["name"], check=False)


@dataclasses.dataclass(frozen=True)
class Tenants:
    """Two tenant namespaces and the people bound in the first one."""

    a: str
    b: str
    editor: str = "alice"
    """Has kubetune-edit in `a`."""
    viewer: str = "bob"
    """Has kubetune-view in `a`."""
    namespace_editor: str = "carol"
    """Has the built-in `edit` role in `a` (kubetune-edit through aggregation)."""
    namespace_viewer: str = "dave"
    """Has the built-in `view` role in `a` (kubetune-view through aggregation)."""


@pytest.fixture(scope="module")
def tenants(cluster: Any, release: Release) -> Iterator[Tenants]:
    suffix = secrets.token_hex(3)
    people = Tenants(a=f"tenant-a-{suffix}", b=f"tenant-b-{suffix}")
    for namespace in (people.a, people.b):
        restricted_namespace(cluster, namespace)
    for user, role in ((people.editor, "kubetune-edit"), (people.viewer, "kubetune-view"),
                       (people.namespace_editor, "edit"), (people.namespace_viewer, "view")):
        cluster.kubectl("-n", people.a, "create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                        f"--user={user}")
    yield people
    for namespace in (people.a, people.b):
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def finetunejob(name: str, **spec: Any) -> dict[str, Any]:
    """A small valid FineTuneJob in the contract's vocabulary."""
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/base/tiny-gpt2"},
            "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
            "output": {"storage": "pvc://models/finetunes"},
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "backoffLimit": 1,
        },
    }
    body["spec"].update(spec)
    return body


def can_i(cluster: Any, verb: str, resource: str, *args: str, as_user: str, groups: tuple[str, ...] = ()) -> bool:
    """`kubectl auth can-i VERB RESOURCE ... --as` run by the admin: True for yes, False for no.

    `resource` may name a subresource as `finetunejobs.kubetune.io/status` (kubectl itself would
    read the part after the slash as an object name).
    """
    resource, _, subresource = resource.partition("/")
    impersonation = [f"--as={as_user}", *(f"--as-group={g}" for g in groups)]
    if subresource:
        impersonation.append(f"--subresource={subresource}")
    proc = cluster.kubectl("auth", "can-i", verb, resource, *args, *impersonation, check=False)
    answer = proc.stdout.strip()
    if answer not in ("yes", "no"):
        raise AssertionError(f"kubectl auth can-i {' '.join(args)} answered {answer!r}: {proc.stderr}")
    return answer == "yes"


def kubectl_as(cluster: Any, user: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """kubectl run as `user` (a minted client certificate), never raising."""
    result: subprocess.CompletedProcess[str] = cluster.kubectl(*args, input=input, check=False, user=user)
    return result
