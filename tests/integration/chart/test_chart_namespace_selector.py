"""`watchNamespaceSelector`: the operator gets a Role in each namespace whose labels match, found on the
live API server by Helm's `lookup`, and nothing cluster-wide; rendered without a cluster (as Argo CD
does) the chart refuses instead of silently falling back to cluster-wide permissions."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart

from tests.integration.chart.conftest import restricted_namespace


def helm_template(helm_bin: Path, kubeconfig: Path | None, *args: str,
                  release: str = "kubetune") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)} if kubeconfig else {**os.environ, "KUBECONFIG": "/nonexistent"}
    live = ["--dry-run=server"] if kubeconfig else []
    return subprocess.run([str(helm_bin), "template", release, str(chart.CHART_DIR), "--namespace", "kubetune-sel",
                           *live, *args], capture_output=True, text=True, env=env, timeout=120)


def test_matching_namespaces_get_a_role_each_and_nothing_cluster_wide(cluster: Any, helm_bin: Path) -> None:
    label = f"kubetune-test-tenant-{secrets.token_hex(3)}"
    matching = [f"sel-a-{label[-6:]}", f"sel-b-{label[-6:]}"]
    other = f"sel-other-{label[-6:]}"
    for namespace in (*matching, other):
        restricted_namespace(cluster, namespace)
    for namespace in matching:
        cluster.kubectl("label", "namespace", namespace, f"{label}=yes")
    # A release name of its own: `--dry-run=server` refuses to "adopt" cluster-scoped objects that
    # other tests on this control plane created under the default release's names.
    release = f"kubetune-{label[-6:]}"
    # (The tenant ClusterRoles have fixed names, made by other tests: not this test's subject.)
    proc = helm_template(helm_bin, cluster.kubeconfig, "--set", f"watchNamespaceSelector.{label}=yes",
                         "--set", "tenantRoles.create=false", release=release)
    assert proc.returncode == 0, proc.stderr
    manifests = [m for m in yaml.safe_load_all(proc.stdout) if m]
    roles = chart.find(manifests, "Role", f"{release}-operator")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(matching)
    assert chart.find(manifests, "ClusterRole", f"{release}-operator") == []
    assert not [r for r in chart.find(manifests, "ClusterRoleBinding")
                if r["roleRef"]["name"] == f"{release}-operator"]
    deployment = chart.find(manifests, "Deployment")[0]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_NAMESPACES"] == ",".join(sorted(matching))
    for namespace in (*matching, other):
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_without_a_cluster_it_refuses_rather_than_going_cluster_wide(helm_bin: Path) -> None:
    proc = helm_template(helm_bin, None, "--set", "watchNamespaceSelector.team=a")
    assert proc.returncode != 0
    assert "watchNamespaceSelector matched no namespace" in proc.stderr


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={team-a}"]], ids=["cluster-wide", "listed"])
def test_without_a_selector_nothing_changes(helm_bin: Path, values: list[str]) -> None:
    assert helm_template(helm_bin, None, *values).returncode == 0
