"""The rendered chart on the real API server: it applies, its pod is admitted under `restricted`,
and the operator's ServiceAccount can do what the operator does and nothing more.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart

from tests.integration.chart.conftest import Release, can_i, restricted_namespace, wait_for

OPTION_SETS = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["@a", "@b"]},
    "every-option-but-the-service-monitor": {
        "grafanaDashboard": {"enabled": True}, "rbac": {"clusterObserver": False},
        "progressKey": {"existingSecret": "platform-key"}, "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
        "policy": {"defaults": {"maxConcurrentJobs": 2, "maxGpusPerJob": 4, "maxTotalGpus": 8,
                                "allowedModelSources": ["pvc://*"], "allowedServingImages": ["registry.example/*"]},
                   "namespaces": {"research": {"maxTotalGpus": 32}}}},
}


@pytest.mark.parametrize("option_set", sorted(OPTION_SETS))
def test_the_rendered_chart_passes_a_server_side_dry_run_without_pod_security_warnings(
        cluster: Any, helm_bin: Path, chart_crds: None, option_set: str) -> None:
    suffix = secrets.token_hex(3)
    namespace = f"kubetune-dry-{suffix}"
    restricted_namespace(cluster, namespace)
    values = json.loads(json.dumps(OPTION_SETS[option_set]).replace("@", f"watched-{suffix}-"))
    for watched in values.get("watchNamespaces", []):
        restricted_namespace(cluster, watched)
    manifests = chart.render(helm_bin, values, release=f"dry-{suffix}", namespace=namespace)
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(manifests), check=False)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == len(manifests), proc.stdout
    # A dry run creates nothing.
    assert cluster.kubectl("-n", namespace, "get", "deployments", "-o", "name").stdout.strip() == ""


def test_the_operator_pod_is_admitted_in_a_restricted_namespace(cluster: Any, release: Release) -> None:
    """The ReplicaSet controller creates the pod only if Pod Security admission lets it."""
    selector = ",".join(f"{k}={v}" for k, v in chart.find(release.manifests, "Deployment")[0]
                        ["spec"]["selector"]["matchLabels"].items())

    def pod() -> dict[str, Any] | None:
        items = json.loads(cluster.kubectl("-n", release.namespace, "get", "pods", "-l", selector,
                                           "-o", "json").stdout)["items"]
        return items[0] if items else None

    def failed_creates() -> str:
        return str(cluster.kubectl("-n", release.namespace, "get", "events",
                                   "--field-selector=reason=FailedCreate", "-o", "name").stdout.strip())

    created = wait_for(lambda: pod() or failed_creates(), "the operator pod (or a FailedCreate event)")
    assert isinstance(created, dict), cluster.kubectl("-n", release.namespace, "get", "events").stdout
    container = created["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_crd_upgrade_path_applies_again_over_an_installed_crd(cluster: Any, chart_crds: None) -> None:
    proc = cluster.kubectl("apply", "--server-side", "-f", str(Path(chart.CHART_DIR) / "crds"))
    assert "serverside-applied" in proc.stdout


class TestOperatorServiceAccount:
    """`kubectl auth can-i --as=system:serviceaccount:...`, asked by the admin."""

    @pytest.mark.parametrize(("verb", "resource"), [
        ("watch", "finetunejobs.kubetune.io"), ("patch", "finetunejobs.kubetune.io/status"),
        ("create", "jobs.batch"), ("delete", "jobs.batch"), ("list", "pods"), ("create", "configmaps"),
        ("get", "secrets"), ("create", "secrets"), ("delete", "secrets"), ("create", "events"),
        ("create", "deployments.apps"), ("create", "services"),
    ])
    def test_may_do_what_the_operator_does_in_any_namespace(self, cluster: Any, release: Release,
                                                            verb: str, resource: str) -> None:
        assert can_i(cluster, verb, resource, "-n", "any-tenant", as_user=release.service_account)

    @pytest.mark.parametrize(("verb", "resource"), [
        ("list", "secrets"), ("watch", "secrets"), ("update", "secrets"), ("create", "pods"),
        ("delete", "pods"), ("update", "finetunejobs.kubetune.io"), ("delete", "finetunejobs.kubetune.io"),
        ("create", "rolebindings.rbac.authorization.k8s.io"), ("get", "nodes"),
        ("create", "clusterroles.rbac.authorization.k8s.io"), ("delete", "namespaces"),
        ("create", "pods/exec"), ("create", "serviceaccounts/token"),
    ])
    def test_may_not_do_anything_else(self, cluster: Any, release: Release, verb: str, resource: str) -> None:
        assert not can_i(cluster, verb, resource, "-n", "any-tenant", as_user=release.service_account)
        assert not can_i(cluster, verb, resource, "--all-namespaces", as_user=release.service_account)

    def test_cannot_list_secrets_cluster_wide_or_in_its_own_namespace(self, cluster: Any, release: Release) -> None:
        assert not can_i(cluster, "list", "secrets", "--all-namespaces", as_user=release.service_account)
        assert not can_i(cluster, "list", "secrets", "-n", release.namespace, as_user=release.service_account)


class TestOperatorIdentityHelper:
    def test_the_minted_kubeconfig_is_the_service_account_under_the_charts_rbac(
            self, cluster: Any, helm_bin: Path, chart_crds: None) -> None:
        namespace = f"kubetune-helper-{secrets.token_hex(3)}"
        identity = chart.install_operator_rbac(cluster, helm_bin, release="helper", namespace=namespace)
        assert identity.username == f"system:serviceaccount:{namespace}:helper-kubetune"

        whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=identity.kubeconfig).stdout)
        assert whoami["status"]["userInfo"]["username"] == identity.username
        assert set(identity.groups) <= set(whoami["status"]["userInfo"]["groups"])

        listed = cluster.kubectl("get", "finetunejobs", "--all-namespaces", kubeconfig=identity.kubeconfig,
                                 check=False)
        assert listed.returncode == 0, listed.stderr
        # kopf matches KUBETUNE_NAMESPACES patterns (e.g. `kubetune-optest-*`) against listed namespaces.
        assert cluster.kubectl("get", "namespaces", kubeconfig=identity.kubeconfig, check=False).returncode == 0
        secrets_listed = cluster.kubectl("get", "secrets", "--all-namespaces", kubeconfig=identity.kubeconfig,
                                         check=False)
        assert secrets_listed.returncode != 0 and "forbidden" in secrets_listed.stderr.lower()
