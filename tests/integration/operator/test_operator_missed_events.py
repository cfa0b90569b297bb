"""The operator acts on FineTuneJobs kopf has not delivered, and only when no peer may hold the lead.

kopf watches a namespace matched by a pattern (`team-*`) only once its own namespace watch has reported
the namespace, and a watch it is retrying (the API server answers 429 while a resource's storage
initialises) delivers nothing meanwhile. The operator's resync therefore also reconciles the jobs its
own cluster-wide informer holds. The worst case is a kopf that never sees a namespace: the chart's
`rbac.clusterObserver: false` leaves it no right to list namespaces, so with patterns it watches none.

The other side: a standby replica (kopf paused by a live peer of higher priority) must do nothing, so the
resync looks past kopf only where no peering object exists (the chart creates one only for standbys).
"""

from __future__ import annotations

import secrets
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.operator.conftest import (
    NAMESPACE_PREFIX, Kube, OperatorProcess, finetunejob, wait_for)
from tests.integration.sweep.conftest import sweep_manifest

REPO = Path(__file__).resolve().parents[3]
PEERING_CRDS = REPO / "crds" / "kopf-peerings.kopf.dev.yaml"
SWEEP_CRD = REPO / "crds" / "finetunesweeps.kubetune.io.yaml"
BLIND_USER = "kubetune-test-operator-without-namespace-list"
RESYNC_SECONDS = 2

# The chart's operator rules (charts/kubetune/templates/rbac-operator.yaml) and CRD discovery, but no
# right to list or watch namespaces (`rbac.clusterObserver: false`).
BLIND_RULES = [
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status", "finetunesweeps/status"], "verbs": ["patch"]},
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/finalizers", "finetunesweeps/finalizers"],
     "verbs": ["update"]},
    {"apiGroups": ["kubetune.io"], "resources": ["finetunesweeps"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "delete"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "update", "delete"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings", "clusterkopfpeerings"],
     "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]


@pytest.fixture(scope="module")
def peering_crds(cluster: Any) -> None:
    for path in (PEERING_CRDS, SWEEP_CRD):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for name in ("kopfpeerings.kopf.dev", "finetunesweeps.kubetune.io"):
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Operators a test starts; each stopped at the end, whatever happened."""
    processes: list[OperatorProcess] = []
    yield processes
    for process in processes:
        process.stop()


def start_operator(cluster: Any, log_dir: Path, started: list[OperatorProcess],
                   kubeconfig: Path | None = None, resync_seconds: float = RESYNC_SECONDS) -> OperatorProcess:
    process = OperatorProcess(kubeconfig or cluster.kubeconfig, log_dir)
    process.env["KUBETUNE_NAMESPACES"] = f"{NAMESPACE_PREFIX}*"
    process.env["KUBETUNE_RESYNC_SECONDS"] = str(resync_seconds)
    started.append(process)
    process.start()
    return process


def metric(operator: OperatorProcess, name: str, **labels: str) -> float:
    """One sample of the operator's /metrics (0 when the series does not exist yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def resync_passes(operator: OperatorProcess) -> float:
    return metric(operator, "kubetune_resync_passes_total", resource="finetunejobs")


def blind_operator(cluster: Any, started: list[OperatorProcess], tmp_path: Path,
                   resync_seconds: float = RESYNC_SECONDS) -> OperatorProcess:
    """An operator whose kopf may not list namespaces: with a pattern, kopf watches none of them."""
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": BLIND_USER}, "rules": BLIND_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": BLIND_USER},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": BLIND_USER},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": BLIND_USER}]},
    ]))
    operator = start_operator(cluster, tmp_path, started, cluster.mint_kubeconfig(BLIND_USER), resync_seconds)
    wait_for(lambda: "Not enough permissions to list namespaces" in operator.log_tail(400),
             "kopf to report that it cannot list namespaces")
    return operator


def test_a_job_and_a_sweep_in_a_namespace_kopf_never_watches_are_still_served(
        cluster: Any, kube: Kube, finetunejob_crd: None, peering_crds: None, namespace: str,
        started: list[OperatorProcess], tmp_path: Path) -> None:
    operator = blind_operator(cluster, started, tmp_path)

    kube.create_ftj(namespace, finetunejob("unseen"))
    wait_for(lambda: kube.job(namespace, "unseen-validate"), "the validation Job of a job kopf never saw",
             timeout=10 * RESYNC_SECONDS)
    assert metric(operator, "kubetune_resync_undelivered_total", resource="finetunejobs") >= 1
    kube.custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunesweeps",
                                                sweep_manifest("unseen-sweep"))
    wait_for(lambda: kube.custom.list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", label_selector="kubetune.io/sweep=unseen-sweep")["items"],
        "the first trial of a sweep kopf never saw", timeout=10 * RESYNC_SECONDS)
    assert "reconcile of" not in operator.log_tail(400), operator.log_tail(400)


def test_events_kopf_never_delivers_are_handled_within_seconds_without_a_resync(
        cluster: Any, kube: Kube, finetunejob_crd: None, peering_crds: None, namespace: str,
        started: list[OperatorProcess], tmp_path: Path) -> None:
    """No resync for 600 s and a kopf that watches nothing: the operator's own informers' events drive the
    job: created -> validation Job (`DeliveryWatch`, 5 s after a FineTuneJob event kopf has not matched);
    validation pod ended -> trainer Job (the informers are the children's only watch)."""
    operator = blind_operator(cluster, started, tmp_path, resync_seconds=600)

    kube.create_ftj(namespace, finetunejob("quiet"))
    wait_for(lambda: kube.job(namespace, "quiet-validate"), "the validation Job, from the informer's event",
             timeout=30)
    kube.run_pod_to_end(namespace, "quiet-validate", 0, '{"outcome": "validated"}')
    wait_for(lambda: kube.job(namespace, "quiet-train"), "the trainer Job, from the pod's informer event",
             timeout=30)
    assert metric(operator, "kubetune_resync_passes_total", resource="finetunejobs") == 0
    assert metric(operator, "kubetune_resync_undelivered_total", resource="finetunejobs") >= 1


def test_a_standby_does_nothing_until_the_peer_that_leads_is_gone(
        cluster: Any, kube: Kube, finetunejob_crd: None, peering_crds: None, namespace: str,
        started: list[OperatorProcess], tmp_path: Path) -> None:
    operator = start_operator(cluster, tmp_path, started)
    rival = f"rival-{secrets.token_hex(3)}"
    kube.custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
        "metadata": {"name": operator.env["KUBETUNE_PEERING"]},
        "status": {rival: {"priority": 100, "lifetime": 120,
                           "lastseen": datetime.now(timezone.utc).isoformat()}}})
    wait_for(lambda: "Pausing operations in favour of" in operator.log_tail(400), "kopf to pause for the rival")
    # kopf logs the pause before its watch streams have closed (each closes on its own task): an event
    # arriving in between is still handled. Let one resync interval pass, so they have.
    paused_at = resync_passes(operator)
    wait_for(lambda: resync_passes(operator) >= paused_at + 1, "a resync pass after kopf paused",
             timeout=10 * RESYNC_SECONDS)

    kube.create_ftj(namespace, finetunejob("waits"))
    passes = resync_passes(operator)
    wait_for(lambda: resync_passes(operator) >= passes + 2, "two resync passes after the job was created",
             timeout=10 * RESYNC_SECONDS)
    assert kube.job(namespace, "waits-validate") is None, "a standby acted while a peer held the lead"

    kube.custom.patch_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings",
                                               operator.env["KUBETUNE_PEERING"], {"status": {rival: None}})
    wait_for(lambda: kube.job(namespace, "waits-validate"), "the validation Job once the rival is gone")
