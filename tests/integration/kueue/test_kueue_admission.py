"""FineTuneJobs with `spec.resources.queueName` through a real Kueue (v0.17, built from its Go module).

Kueue, the Job controller and the operator all run for real on the control plane; the tests play the
kubelet (pod status) and the user (FineTuneJobs, quota). Each test gets a ClusterQueue that serves its
namespace only, with a given number of `nvidia.com/gpu` (the trainer pods request GPUs; nothing runs
them, so no node needs to have any), and LocalQueue `team`. What is checked is what Kueue records
(its Workloads' conditions), what the Jobs do, and what the FineTuneJobs' status says.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.dev.kueue import Kueue
from tests.integration.kueue.conftest import (HIGH, LOCAL_QUEUE, LOW, Queues, checkpoint_report, condition_is,
                                              live_pods, suspended, token_of, validate)
from tests.integration.operator.conftest import Kube, OperatorProcess, finetunejob, wait_for

pytestmark = pytest.mark.integration


def queued_job(name: str, *, gpus: int = 1, nodes: int = 1, **resources: Any) -> dict[str, Any]:
    return finetunejob(name, resources={"gpus": gpus, "nodes": nodes, "cpu": "1", "memory": "1Gi",
                                        "queueName": LOCAL_QUEUE, **resources})


def start_pods(kube: Kube, namespace: str, name: str, count: int = 1) -> list[dict[str, Any]]:
    """Waits for `count` pods of the trainer Job and runs them (as a kubelet would)."""
    pods = wait_for(lambda: (found := live_pods(kube, namespace, name)) and len(found) == count and found,
                    f"{count} trainer pod(s) of {name}")
    for pod in pods:
        kube.set_pod_running(namespace, pod)
    wait_for(lambda: kube.condition_is(namespace, name, "Running", "True", "Training"), f"{name} Running=True")
    return list(pods)


def waits_in_queue(kube: Kube, queues: Queues, namespace: str, name: str) -> dict[str, Any]:
    """Waits until Kueue has tried and failed to reserve quota for the job's Workload (a positive signal
    that Kueue looked at it) and the FineTuneJob says Kueue holds it; returns that Running condition."""
    wait_for(lambda: condition_is(queues.workload(f"{name}-train"), "QuotaReserved", "False"),
             f"Kueue to find no room for {name}")
    wait_for(lambda: kube.condition_is(namespace, name, "Running", "False", "QueuedByKueue"),
             f"{name} Running=False QueuedByKueue")
    running = kube.condition(namespace, name, "Running")
    assert running is not None and f"LocalQueue {LOCAL_QUEUE}" in running["message"], running
    assert suspended(kube, namespace, name) is True
    assert live_pods(kube, namespace, name) == [], "a job Kueue holds has no pod"
    assert kube.condition_is(namespace, name, "Suspended", "False"), "the user did not suspend it"
    return running


def test_a_two_pod_job_waits_until_the_cluster_queue_has_room_for_both_pods(
        kube: Kube, kueue: Kueue, operator: OperatorProcess, queues: Queues, namespace: str) -> None:
    assert kueue.version == "v0.17.0"
    queues.create(gpus=1)
    kube.create_ftj(namespace, queued_job("gang", nodes=2))
    validate(kube, namespace, "gang")
    trainer = kube.job(namespace, "gang-train")
    assert trainer is not None and trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == LOCAL_QUEUE

    waits_in_queue(kube, queues, namespace, "gang")
    workload = queues.workload("gang-train")
    assert workload is not None
    assert [pod_set["count"] for pod_set in workload["spec"]["podSets"]] == [2], "one pod set: the whole gang"
    # Kueue's reason reaches status on the operator's next pass (a Workload's change is no event for it).
    running = wait_for(lambda: (c := kube.condition(namespace, "gang", "Running")) and
                       "nvidia.com/gpu" in c["message"] and c, "Kueue's reason (GPU quota) in status")
    assert running["reason"] == "QueuedByKueue"
    assert running["message"].startswith(f"waiting for Kueue to admit the trainer Job from LocalQueue {LOCAL_QUEUE}: ")

    queues.set_gpus(2)
    wait_for(lambda: queues.admitted("gang-train"), "Kueue to admit the gang once both pods fit")
    wait_for(lambda: suspended(kube, namespace, "gang") is False, "Kueue to unsuspend the trainer Job")
    start_pods(kube, namespace, "gang", count=2)
    admission = (queues.workload("gang-train") or {})["status"]["admission"]
    assert [p["count"] for p in admission["podSetAssignments"]] == [2]
    assert admission["podSetAssignments"][0]["resourceUsage"]["nvidia.com/gpu"] == "2"


def test_two_jobs_over_the_quota_run_one_after_the_other(
        kube: Kube, operator: OperatorProcess, queues: Queues, namespace: str) -> None:
    queues.create(gpus=1)
    kube.create_ftj(namespace, queued_job("first"))
    validate(kube, namespace, "first")
    wait_for(lambda: queues.admitted("first-train"), "Kueue to admit the first job")
    (first_pod,) = start_pods(kube, namespace, "first")

    kube.create_ftj(namespace, queued_job("second"))
    validate(kube, namespace, "second")
    waits_in_queue(kube, queues, namespace, "second")
    assert suspended(kube, namespace, "first") is False

    kube.set_pod_finished(namespace, first_pod, 0, json.dumps({"outcome": "succeeded"}))
    wait_for(lambda: kube.condition_is(namespace, "first", "Succeeded", "True"), "the first job to succeed")
    wait_for(lambda: queues.admitted("second-train"), "Kueue to admit the second job once the first finished")
    start_pods(kube, namespace, "second")
    # Never both at once, by Kueue's own record: the second was admitted only after the first finished.
    finished = queues.workload_condition("first-train", "Finished")
    admitted = queues.workload_condition("second-train", "Admitted")
    assert finished is not None and finished["status"] == "True"
    assert admitted is not None and admitted["lastTransitionTime"] >= finished["lastTransitionTime"]


def test_a_preempted_job_keeps_its_checkpoints_and_resumes_when_readmitted(
        kube: Kube, operator: OperatorProcess, priority_classes: None, queues: Queues, namespace: str) -> None:
    queues.create(gpus=1)
    kube.create_ftj(namespace, queued_job("low", priorityClassName=LOW))
    validate(kube, namespace, "low")
    wait_for(lambda: queues.admitted("low-train"), "Kueue to admit the low-priority job")
    (low_pod,) = start_pods(kube, namespace, "low")
    trainer_uid = (kube.job(namespace, "low-train") or {})["metadata"]["uid"]
    status, _ = operator.post_report(checkpoint_report(kube.ftj(namespace, "low"), 20), token_of(kube, namespace, "low"))
    assert status == 202
    wait_for(lambda: [c["step"] for c in kube.ftj(namespace, "low")["status"].get("checkpoints") or []] == [20],
             "the checkpoint in status")

    kube.create_ftj(namespace, queued_job("high", priorityClassName=HIGH))
    validate(kube, namespace, "high")
    wait_for(lambda: condition_is(queues.workload("low-train"), "Evicted", "True", "Preempted"),
             "Kueue to preempt the low-priority job")
    wait_for(lambda: suspended(kube, namespace, "low") is True, "Kueue to suspend the preempted trainer Job")
    wait_for(lambda: kube.condition_is(namespace, "low", "Running", "False", "QueuedByKueue"),
             "the preempted job reported as held by Kueue")
    running = kube.condition(namespace, "low", "Running")
    assert running is not None and running["message"].startswith("evicted by Kueue (Preempted"), running
    wait_for(lambda: queues.admitted("high-train"), "Kueue to admit the high-priority job")
    (high_pod,) = start_pods(kube, namespace, "high")
    assert live_pods(kube, namespace, "low") == []
    low = kube.ftj(namespace, "low")
    assert not kube.condition_is(namespace, "low", "Failed", "True")
    assert kube.condition_is(namespace, "low", "Suspended", "False"), "Kueue's suspension is not the user's"
    assert [c["step"] for c in low["status"]["checkpoints"]] == [20], "a preemption keeps the checkpoints"

    kube.set_pod_finished(namespace, high_pod, 0, json.dumps({"outcome": "succeeded"}))
    wait_for(lambda: queues.admitted("low-train"), "Kueue to readmit the preempted job")
    (resumed,) = start_pods(kube, namespace, "low")
    assert resumed["metadata"]["name"] != low_pod["metadata"]["name"]
    trainer = kube.job(namespace, "low-train")
    assert trainer is not None and trainer["metadata"]["uid"] == trainer_uid, \
        "the same trainer Job (same config, same output and checkpoint folder) runs again"
    assert resumed["spec"]["volumes"] == low_pod["spec"]["volumes"]
    assert [c["step"] for c in kube.ftj(namespace, "low")["status"]["checkpoints"]] == [20]


def test_the_users_suspend_and_kueues_do_not_fight_and_status_says_which_holds_the_job(
        kube: Kube, operator: OperatorProcess, queues: Queues, namespace: str) -> None:
    queues.create(gpus=1)
    kube.create_ftj(namespace, queued_job("mine"))
    validate(kube, namespace, "mine")
    wait_for(lambda: queues.admitted("mine-train"), "Kueue to admit the job")
    start_pods(kube, namespace, "mine")
    kube.create_ftj(namespace, queued_job("other"))
    validate(kube, namespace, "other")
    waits_in_queue(kube, queues, namespace, "other")

    # The user suspends: the operator deactivates the Workload, Kueue evicts it and suspends the Job.
    kube.patch_ftj(namespace, "mine", {"spec": {"suspend": True}})
    wait_for(lambda: condition_is(queues.workload("mine-train"), "Evicted", "True", "Deactivated"),
             "Kueue to evict the deactivated Workload")
    wait_for(lambda: kube.condition_is(namespace, "mine", "Suspended", "True", "SuspendedByUser"),
             "Suspended=True SuspendedByUser")
    assert kube.condition_is(namespace, "mine", "Running", "False", "SuspendedByUser")
    # Positive proof that Kueue let go of it: the quota went to the other job.
    wait_for(lambda: queues.admitted("other-train"), "Kueue to admit the other job with the freed quota")
    start_pods(kube, namespace, "other")
    job = kube.job(namespace, "mine-train")
    assert job is not None and job["spec"]["suspend"] is True
    generation = job["metadata"]["generation"]
    assert (queues.workload("mine-train") or {})["spec"]["active"] is False

    # The user resumes while the quota is taken: now Kueue holds it, and status says so.
    kube.patch_ftj(namespace, "mine", {"spec": {"suspend": False}})
    wait_for(lambda: (queues.workload("mine-train") or {}).get("spec", {}).get("active") is True,
             "the operator to reactivate the Workload")
    wait_for(lambda: kube.condition_is(namespace, "mine", "Running", "False", "QueuedByKueue"),
             "Running=False QueuedByKueue after the resume")
    assert kube.condition_is(namespace, "mine", "Suspended", "False")
    wait_for(lambda: condition_is(queues.workload("mine-train"), "QuotaReserved", "False"),
             "Kueue to requeue the reactivated Workload")
    # Kueue's reason reaches the message on the operator's next pass: the job waits for quota; the
    # deactivation (the user's suspend, over) is not reported as an eviction.
    wait_for(lambda: (c := kube.condition(namespace, "mine", "Running")) and c["message"].startswith(
        f"waiting for Kueue to admit the trainer Job from LocalQueue {LOCAL_QUEUE}: "), "Kueue's reason in status")
    job = kube.job(namespace, "mine-train")
    assert job is not None and job["spec"]["suspend"] is True
    assert job["metadata"]["generation"] == generation, "nobody flipped the Job's suspend while it waited"

    (other_pod,) = live_pods(kube, namespace, "other")
    kube.set_pod_finished(namespace, other_pod, 0, json.dumps({"outcome": "succeeded"}))
    wait_for(lambda: queues.admitted("mine-train"), "Kueue to readmit the job")
    start_pods(kube, namespace, "mine")
    assert kube.condition_is(namespace, "mine", "Suspended", "False")
