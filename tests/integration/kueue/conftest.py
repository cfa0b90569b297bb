"""Fixtures for the Kueue tests: a real Kueue v0.17 (``kubetune.dev.kueue``) on the session's control
plane, the operator as a real process, and per test a ClusterQueue for the test's namespace only with
a LocalQueue in it.

There is no kubelet, as in tests/integration/operator: tests play its part by patching pod status.
Kueue, the Job controller and the operator are real; what Kueue admits, suspends and preempts is
Kueue's own decision on the quota the test gives the ClusterQueue.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from kubetune.dev import controlplane
from kubetune.dev.kueue import Kueue
from tests.integration.operator.conftest import (CRD_FILE, GROUP, NAMESPACE_PREFIX, PLURAL, VERSION, Kube,
                                                OperatorProcess, wait_for)

KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
FLAVOR = "kubetune-test-flavor"
LOCAL_QUEUE = "team"
LOW, HIGH = "kubetune-test-low", "kubetune-test-high"
"""PriorityClasses (scheduling.k8s.io) of the preemption test: Kueue takes a Workload's priority from
its pods' `priorityClassName`, which `spec.resources.priorityClassName` sets."""
POLICY = f"""\
apiVersion: kubetune.io/v1alpha1
kind: PlatformPolicy
defaults:
  allowedPriorityClasses: [{LOW}, {HIGH}]
namespaces: {{}}
"""


@pytest.fixture(scope="module")
def kueue(cluster: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with Kueue(tmp_path_factory.mktemp("kueue"), cluster) as running:
        yield running


@pytest.fixture(scope="module")
def kube(cluster: controlplane.ControlPlane) -> Kube:
    return Kube(cluster.api_client())


@pytest.fixture(scope="module")
def operator(cluster: controlplane.ControlPlane, kueue: Kueue,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator with a policy that allows the two test PriorityClasses; Kueue is up before it."""
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
    folder = tmp_path_factory.mktemp("kueue-operator")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY)
    process = OperatorProcess(cluster.kubeconfig, folder)
    process.env |= {"KUBETUNE_POLICY_FILE": str(policy)}
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def priority_classes(kube: Kube) -> None:
    scheduling = kubernetes.client.SchedulingV1Api(kube.client)
    for name, value in ((LOW, 100), (HIGH, 1000)):
        try:
            scheduling.create_priority_class({"metadata": {"name": name}, "value": value,
                                              "preemptionPolicy": "PreemptLowerPriority"})
        except ApiException as error:
            if error.status != 409:
                raise


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A tenant namespace that enforces the `restricted` Pod Security level. Deleting it waits until
    Kueue has released its Workloads (each carries Kueue's finalizer): with Kueue stopped first, the
    namespace would stay Terminating for the rest of the session."""
    name = f"{NAMESPACE_PREFIX}{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}})
    yield name
    # The FineTuneJobs first (their Jobs go with them, and Kueue then finalizes the Workloads), while
    # Kueue still runs; then the namespace.
    kube.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
    wait_for(lambda: not kube.custom.list_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, name,
                                                                   "workloads")["items"],
             f"Kueue to release the Workloads of namespace {name}")
    kube.core.delete_namespace(name)


class Queues:
    """Kueue's objects for one test: the ResourceFlavor, a ClusterQueue serving only the test's
    namespace, its LocalQueue; and reads of the Workloads Kueue makes for trainer Jobs."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.cluster_queue = f"kubetune-test-{namespace.removeprefix(NAMESPACE_PREFIX)}"

    def create(self, *, gpus: int, cpu: str = "16") -> None:
        """The flavor (shared), a ClusterQueue with `gpus` nvidia.com/gpu and `cpu` (memory to spare)
        that preempts lower-priority Workloads of its own, and LocalQueue `team`; waits until both
        queues are active."""
        custom = self.kube.custom
        try:
            custom.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "resourceflavors", {
                "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "ResourceFlavor",
                "metadata": {"name": FLAVOR}})
        except ApiException as error:
            if error.status != 409:
                raise
        custom.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "ClusterQueue",
            "metadata": {"name": self.cluster_queue},
            "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
                     "preemption": {"withinClusterQueue": "LowerPriority"},
                     "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                         "flavors": [{"name": FLAVOR, "resources": self._quota(gpus, cpu)}]}]}})
        custom.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, self.namespace, "localqueues", {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "LocalQueue",
            "metadata": {"name": LOCAL_QUEUE, "namespace": self.namespace},
            "spec": {"clusterQueue": self.cluster_queue}})
        wait_for(lambda: _condition_is(custom.get_cluster_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", self.cluster_queue), "Active", "True"),
            "the ClusterQueue to be active")
        wait_for(lambda: _condition_is(custom.get_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, self.namespace, "localqueues", LOCAL_QUEUE), "Active", "True"),
            "the LocalQueue to be active")

    @staticmethod
    def _quota(gpus: int, cpu: str = "16") -> list[dict[str, Any]]:
        return [{"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": "64Gi"},
                {"name": "nvidia.com/gpu", "nominalQuota": gpus}]

    def set_gpus(self, gpus: int) -> None:
        """Gives the ClusterQueue `gpus` nvidia.com/gpu (a merge patch replaces the resource groups)."""
        self.kube.custom.patch_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", self.cluster_queue, {
            "spec": {"resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                         "flavors": [{"name": FLAVOR, "resources": self._quota(gpus)}]}]}})

    def delete(self) -> None:
        try:
            self.kube.custom.delete_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues",
                                                          self.cluster_queue)
        except ApiException as error:
            if error.status != 404:
                raise

    def workload(self, job_name: str) -> dict[str, Any] | None:
        """Kueue's Workload of the Job `job_name` (found by Kueue's job-uid label), or None."""
        job = self.kube.job(self.namespace, job_name)
        if job is None:
            return None
        found = self.kube.custom.list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, self.namespace, "workloads",
            label_selector=f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}")["items"]
        assert len(found) <= 1, f"Kueue made {len(found)} Workloads for Job {job_name}"
        return dict(found[0]) if found else None

    def workload_condition(self, job_name: str, type_: str) -> dict[str, Any] | None:
        workload = self.workload(job_name)
        return None if workload is None else _condition(workload, type_)

    def admitted(self, job_name: str) -> bool:
        workload = self.workload(job_name)
        return workload is not None and _condition_is(workload, "Admitted", "True")


@pytest.fixture
def queues(kube: Kube, namespace: str) -> Iterator[Queues]:
    made = Queues(kube, namespace)
    yield made
    made.delete()


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((dict(c) for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def _condition_is(obj: dict[str, Any], type_: str, status: str, reason: str | None = None) -> bool:
    found = _condition(obj, type_)
    return found is not None and found["status"] == status and (reason is None or found["reason"] == reason)


def condition_is(obj: dict[str, Any] | None, type_: str, status: str, reason: str | None = None) -> bool:
    """Whether `obj` (a Kueue object, may be None) has that condition."""
    return obj is not None and _condition_is(obj, type_, status, reason)


def token_of(kube: Kube, namespace: str, name: str) -> str:
    """The job's progress-report token (what its trainer pod reports with)."""
    secret = kube.core.read_namespaced_secret(f"{name}-progress", namespace)
    return base64.b64decode(secret.data["token"]).decode()


def checkpoint_report(job: dict[str, Any], step: int) -> dict[str, Any]:
    """A trainer's progress report that it wrote a checkpoint at `step`."""
    metadata = job["metadata"]
    return {"job": {"namespace": metadata["namespace"], "name": metadata["name"], "uid": metadata["uid"]},
            "attempt": 0, "seq": 1, "kind": "checkpoint", "time": datetime.now(timezone.utc).isoformat(),
            "step": step, "checkpoint": {"step": step, "path": f"/ckpt/step-{step}"}}


def validate(kube: Kube, namespace: str, name: str) -> None:
    """Plays the dataset-validation pod (it is not queued: it has no queue label) to its end."""
    wait_for(lambda: kube.job(namespace, f"{name}-validate"), f"the validation Job of {name}")
    kube.run_pod_to_end(namespace, f"{name}-validate", 0, json.dumps({"outcome": "validated"}))
    wait_for(lambda: kube.job(namespace, f"{name}-train"), f"the trainer Job of {name}")


def suspended(kube: Kube, namespace: str, name: str) -> bool | None:
    job = kube.job(namespace, f"{name}-train")
    return None if job is None else bool(job["spec"].get("suspend"))


def live_pods(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return kube.pods_with(namespace, f"batch.kubernetes.io/job-name={name}-train")

