"""A preempted job resumes from its own checkpoint: Kueue v0.17.0 with the whole product running for real.

The local stack (control plane, operator process, local node running pods as processes) and a real
Kueue; the trainer is the real program on the tiny model. A low-priority job trains in a ClusterQueue
with room for one job (cpu quota 1); once it reported its first checkpoint, a high-priority job is
created. Kueue preempts the low one: it suspends its Job, the Job controller deletes the pod, the
local node sends SIGTERM and the trainer saves a checkpoint and exits. When the high job is deleted
the quota frees, Kueue readmits the low job, and its new pod resumes from the latest checkpoint the
first pod saved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.dev import stack as local_stack
from kubetune.dev.kueue import Kueue
from tests.integration.kueue.conftest import HIGH, LOCAL_QUEUE, LOW, POLICY, Queues, condition_is
from tests.integration.operator.conftest import GROUP, PLURAL, VERSION, Kube
from tests.reliability.conftest import Tenants, tiny_manifest, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    workdir = tmp_path_factory.mktemp("kueue-stack")
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY)
    with local_stack.LocalStack(workdir, resync_seconds=3, operator_env={
            "KUBETUNE_STATUS_WRITE_INTERVAL": "0.5", "KUBETUNE_POLICY_FILE": str(policy)}) as running:
        yield running


@pytest.fixture(scope="module")
def kueue(stack: local_stack.LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with Kueue(tmp_path_factory.mktemp("kueue"), stack.plane) as running:
        yield running


@pytest.fixture(scope="module")
def kube(stack: local_stack.LocalStack) -> Kube:
    return Kube(stack.plane.api_client())


def reports(stack: local_stack.LocalStack, namespace: str, name: str) -> list[list[dict[str, Any]]]:
    """The progress reports each trainer pod of job `name` printed (one JSON line each), per pod, oldest first."""
    assert stack.node is not None
    logs = sorted((stack.node.workdir / "pods").glob(f"{namespace}_{name}-train-*/trainer/output.log"),
                  key=lambda path: path.stat().st_mtime)
    found: list[list[dict[str, Any]]] = []
    for log in logs:
        pod: list[dict[str, Any]] = []
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"seq"' in line:
                try:
                    pod.append(json.loads(line))
                except ValueError:
                    continue  # a line the pod is still writing
        found.append(pod)
    return found


def queued(name: str, priority: str, epochs: int) -> dict[str, Any]:
    return tiny_manifest(name, serving={"enabled": False}, evaluation={"samples": 0},
                         hyperparameters={"epochs": epochs}, training={"checkpointInterval": 4},
                         resources={"cpu": "1", "memory": "2Gi", "queueName": LOCAL_QUEUE, "priorityClassName": priority})


def test_a_preempted_trainer_saves_a_checkpoint_and_resumes_from_it_when_readmitted(
        stack: local_stack.LocalStack, kueue: Kueue, kube: Kube, priority_classes: None,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    namespace = Tenants(stack, kube, tmp_path_factory.mktemp("models")).create("kueue")
    queues = Queues(kube, namespace)
    queues.create(gpus=0, cpu="1")

    kube.create_ftj(namespace, queued("low", LOW, epochs=40))
    wait_until(lambda: any(r["kind"] == "checkpoint" for pod in reports(stack, namespace, "low") for r in pod), 300,
               "the low-priority job's first checkpoint")
    kube.create_ftj(namespace, queued("high", HIGH, epochs=1))
    wait_until(lambda: condition_is(queues.workload("low-train"), "Evicted", "True", "Preempted"), 120,
               "Kueue to preempt the low-priority job")
    wait_until(lambda: queues.admitted("high-train"), 120, "Kueue to admit the high-priority job")
    wait_until(lambda: kube.condition_is(namespace, "low", "Running", "False", "QueuedByKueue"), 60,
               "the preempted job reported as held by Kueue")
    assert not kube.condition_is(namespace, "low", "Failed", "True")

    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "high")
    wait_until(lambda: queues.admitted("low-train"), 120, "Kueue to readmit the low-priority job")
    # The Job replaces a pod only once the old one is gone (podReplacementPolicy: Failed): when the
    # second pod reports, the first one has exited and its log holds every checkpoint it saved.
    started = wait_until(lambda: (pods := reports(stack, namespace, "low")) and len(pods) == 2 and next(
        (r for r in pods[1] if r["kind"] == "started" and "step" in r), None), 300, "the second low pod to start")
    saved = [r["checkpoint"] for r in reports(stack, namespace, "low")[0] if r["kind"] == "checkpoint"]
    assert saved, "the first pod saved checkpoints"
    assert started["message"] == f"resumed from {saved[-1]['path']}", (started, saved)
    assert started["step"] == saved[-1]["step"] > 0
