"""Quota on the real control plane: a job beyond the namespace's limit waits, and starts when room frees up.

The operator runs as a real process with a platform policy file (the format the
Helm chart renders) and a resync interval far longer than the test, so whatever
starts a waiting job is an event, not polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.operator.conftest import Kube, OperatorProcess, finetunejob, wait_for

POLICY = """\
apiVersion: kubetune.io/v1alpha1
kind: PlatformPolicy
defaults:
  maxConcurrentJobs: 1
  maxGpusPerJob: 2
  maxTotalGpus: 0
  allowedModelSources: ["pvc://models/*"]
  allowedTrainerImages: []
namespaces: {}
"""


@pytest.fixture(scope="module")
def operator_with_policy(cluster: Any, finetunejob_crd: None,
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    folder = tmp_path_factory.mktemp("quota-operator")
    policy_file = folder / "policy.yaml"
    policy_file.write_text(POLICY)
    process = OperatorProcess(cluster.kubeconfig, folder)
    process.env |= {"KUBETUNE_POLICY_FILE": str(policy_file), "KUBETUNE_RESYNC_SECONDS": "600"}
    process.start()
    yield process
    process.stop()


def validate(kube: Kube, namespace: str, name: str) -> None:
    wait_for(lambda: kube.job(namespace, f"{name}-validate"), f"the validation Job of {name}")
    kube.run_pod_to_end(namespace, f"{name}-validate", 0, json.dumps({"outcome": "validated"}))
    wait_for(lambda: kube.job(namespace, f"{name}-train"), f"the trainer Job of {name}")


def suspended(kube: Kube, namespace: str, name: str) -> bool | None:
    job = kube.job(namespace, f"{name}-train")
    return None if job is None else bool(job["spec"].get("suspend"))


def test_the_job_beyond_the_limit_waits_and_starts_when_the_earlier_one_ends(
        kube: Kube, operator_with_policy: OperatorProcess, namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("first"))
    validate(kube, namespace, "first")
    assert suspended(kube, namespace, "first") is False
    first_pod = wait_for(lambda: kube.live_pod(namespace, "first-train"), "the first trainer pod")
    kube.set_pod_running(namespace, first_pod)

    time.sleep(1)  # distinct creation timestamps: the queue is oldest first
    kube.create_ftj(namespace, finetunejob("second"))
    validate(kube, namespace, "second")
    wait_for(lambda: kube.condition_is(namespace, "second", "Running", "False", "QuotaExceeded"),
             "Running=False QuotaExceeded")
    running = kube.condition(namespace, "second", "Running")
    assert running is not None and "1 of 1 concurrent jobs running (maxConcurrentJobs)" in running["message"]
    assert suspended(kube, namespace, "second") is True
    assert kube.live_pod(namespace, "second-train") is None, "a waiting job holds no pod"
    assert kube.ftj(namespace, "second")["status"]["phase"] == "Pending"

    kube.set_pod_finished(namespace, first_pod, 0, json.dumps({"outcome": "succeeded"}))
    wait_for(lambda: kube.condition_is(namespace, "first", "Succeeded", "True"), "the first job to succeed")
    # No resync for 600 s: the trainer Job's completion event is what admits the waiting job.
    wait_for(lambda: suspended(kube, namespace, "second") is False, "the waiting job's trainer to start",
             timeout=20)
    second_pod = wait_for(lambda: kube.live_pod(namespace, "second-train"), "the second trainer pod")
    kube.set_pod_running(namespace, second_pod)
    wait_for(lambda: kube.condition_is(namespace, "second", "Running", "True", "Training"), "Running=True")


def test_a_disallowed_model_source_fails_before_anything_runs(
        kube: Kube, operator_with_policy: OperatorProcess, namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("outsider", model={"source": "hf://someone/unvetted-model"}))
    wait_for(lambda: kube.condition_is(namespace, "outsider", "Failed", "True", "ModelSourceNotAllowed"),
             "Failed=True ModelSourceNotAllowed")
    validated = kube.condition(namespace, "outsider", "Validated")
    assert validated is not None and validated["status"] == "False"
    assert "'hf://someone/unvetted-model' is not allowed" in validated["message"]
    assert "pvc://models/*" in validated["message"]
    assert kube.job(namespace, "outsider-validate") is None and kube.job(namespace, "outsider-train") is None


def test_a_kueue_job_carries_the_queue_label_and_starts_suspended_for_kueue(
        kube: Kube, operator_with_policy: OperatorProcess, namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("queued", resources={"gpus": 1, "queueName": "team-queue"}))
    validate(kube, namespace, "queued")
    trainer = kube.job(namespace, "queued-train")
    assert trainer is not None
    assert trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"
    assert trainer["spec"]["suspend"] is True
    time.sleep(2)
    assert suspended(kube, namespace, "queued") is True, "only Kueue unsuspends a queued job"
    # Kueue admits it (the test plays Kueue): the operator leaves the Job running.
    kube.batch.patch_namespaced_job("queued-train", namespace, {"spec": {"suspend": False}})
    pod = wait_for(lambda: kube.live_pod(namespace, "queued-train"), "the admitted trainer pod")
    kube.set_pod_running(namespace, pod)
    wait_for(lambda: kube.condition_is(namespace, "queued", "Running", "True"), "Running=True after admission")
    assert suspended(kube, namespace, "queued") is False


def test_more_gpus_than_allowed_per_job_waits_with_quota_exceeded(
        kube: Kube, operator_with_policy: OperatorProcess, namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("greedy", resources={"gpus": 4}))
    validate(kube, namespace, "greedy")
    wait_for(lambda: kube.condition_is(namespace, "greedy", "Running", "False", "QuotaExceeded"), "QuotaExceeded")
    running = kube.condition(namespace, "greedy", "Running")
    assert running is not None and "at most 2 per job are allowed (maxGpusPerJob)" in running["message"]
    assert suspended(kube, namespace, "greedy") is True
