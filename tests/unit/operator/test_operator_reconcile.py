"""The level-based reconcile: from what it observes, it decides status, child actions and events."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.operator import conditions
from kubetune.operator.client import status_changes
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed, PatchChild
from kubetune.operator.settings import OperatorSettings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]


def condition(decision: reconcile.Decision, type_: str) -> dict[str, Any]:
    found = conditions.find(decision.status_patch["conditions"], type_)
    assert found is not None, f"no {type_} condition"
    return dict(found)


def created_kinds(decision: reconcile.Decision) -> list[str]:
    return [f"{a.manifest['kind']}/{a.manifest['metadata']['name']}" for a in decision.actions
            if isinstance(a, CreateChild)]


def job_with_conditions(name: str, *conds: tuple[str, str], spec: dict[str, Any] | None = None,
                        **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": {}}, "spec": spec or {},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": f"{r} happened"}
                                      for t, r in conds], **status}}


def pod(phase: str, *, exit_code: int | None = None, message: str = "", attempt: int = 0,
        container: str = "trainer", finished_at: str = "2026-03-01T11:00:00Z") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [{"name": container, "state": {"terminated": {
            "exitCode": exit_code, "message": message, "finishedAt": finished_at}}}]
    return {"metadata": {"name": f"p-{attempt}-{phase}",
                         "annotations": {builders.ANNOTATION_ATTEMPT: str(attempt)}}, "status": status}


def with_children(job: dict[str, Any], settings: OperatorSettings, **children: Any) -> Observed:
    """An observation where the config and secret exist (as the first reconcile created them)."""
    rendered = render.trainer_config_for(job)
    base: dict[str, Any] = {
        "config_map": builders.trainer_configmap(job, rendered),
        "progress_secret": builders.progress_secret(job, "t"),
    }
    base.update(children)
    return Observed(job=job, now=NOW, **base)


def validated_status() -> dict[str, Any]:
    return {"conditions": [{"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "",
                            "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"}]}


class TestANewJob:
    def test_creates_credentials_config_and_the_validation_job_but_no_trainer(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = reconcile.reconcile(Observed(job=make_job(), now=NOW), settings)
        assert created_kinds(decision) == ["Secret/demo-progress", "ConfigMap/demo-config", "Job/demo-validate"]
        assert condition(decision, "Validated")["status"] == "Unknown"
        assert condition(decision, "Validated")["reason"] == "ValidatingDataset"
        assert condition(decision, "Running")["reason"] == "WaitingForValidation"
        assert decision.status_patch["observedGeneration"] == 1
        assert decision.status_patch["phase"] == "Validating"

    def test_emits_events_for_the_conditions_it_sets(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = reconcile.reconcile(Observed(job=make_job(), now=NOW), settings)
        assert ("Normal", "ValidatingDataset") in [(e.type, e.reason) for e in decision.events]

    def test_reconciling_the_same_state_again_emits_no_events(self, make_job: MakeJob,
                                                              settings: OperatorSettings) -> None:
        first = reconcile.reconcile(Observed(job=make_job(), now=NOW), settings)
        job = make_job(status={"conditions": first.status_patch["conditions"]})
        again = reconcile.reconcile(with_children(job, settings, validation_job=job_with_conditions("demo-validate")),
                                    settings)
        assert again.events == () and again.actions == ()

    def test_waiting_writes_status_once_from_each_childs_creation_until_its_pod_ends(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        # A status write costs the API server a CEL-checked update and every watcher an event: the message
        # must not change between "the child was created" and "its pod is pending or running".
        first = reconcile.reconcile(Observed(job=make_job(), now=NOW), settings)
        job = make_job(status=first.status_patch)
        pending = (pod("Pending", container="validate"),)
        validating = reconcile.reconcile(with_children(job, settings, validation_job=job_with_conditions(
            "demo-validate", active=1), validation_pods=pending), settings)
        assert not status_changes(job["status"], validating.status_patch)
        started = reconcile.reconcile(with_children(job, settings, validation_job=job_with_conditions(
            "demo-validate", ("Complete", "Completed"))), settings)
        assert created_kinds(started) == ["Job/demo-train"]
        job = make_job(status=first.status_patch | started.status_patch)
        waiting = reconcile.reconcile(with_children(job, settings, validation_job=job_with_conditions(
            "demo-validate", ("Complete", "Completed")), trainer_job=job_with_conditions("demo-train")), settings)
        assert not status_changes(job["status"], waiting.status_patch)

    def test_an_invalid_spec_creates_nothing_and_fails_with_the_problem(self, make_job: MakeJob,
                                                                         settings: OperatorSettings) -> None:
        decision = reconcile.reconcile(Observed(job=make_job(hyperparameters={"epochs": 0}), now=NOW), settings)
        assert decision.actions == ()
        validated = condition(decision, "Validated")
        assert (validated["status"], validated["reason"]) == ("False", "InvalidSpec")
        assert "spec.hyperparameters.epochs" in validated["message"]
        assert condition(decision, "Failed")["status"] == "True"
        assert decision.status_patch["completionTime"] == "2026-03-01T12:00:00Z"
        assert ("Warning", "InvalidSpec") in [(e.type, e.reason) for e in decision.events]


class TestDatasetValidation:
    def test_a_rejected_dataset_ends_the_job_with_invalid_dataset_and_the_trainers_message(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        summary = json.dumps({"outcome": "failed", "message": "dataset.train: 0 examples left after cleaning"})
        observed = with_children(
            make_job(), settings,
            validation_job=job_with_conditions("demo-validate", ("Failed", "PodFailurePolicy")),
            validation_pods=(pod("Failed", exit_code=78, message=summary, container="validate"),))
        decision = reconcile.reconcile(observed, settings)
        for type_, status in (("Validated", "False"), ("Failed", "True"), ("Succeeded", "False")):
            found = condition(decision, type_)
            assert (found["status"], found["reason"]) == (status, "InvalidDataset")
        assert condition(decision, "Validated")["message"] == "dataset.train: 0 examples left after cleaning"
        assert "Job/demo-train" not in created_kinds(decision)

    def test_a_validation_pod_that_fails_for_other_reasons_is_a_validation_error(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(
            make_job(), settings,
            validation_job=job_with_conditions("demo-validate", ("Failed", "BackoffLimitExceeded")),
            validation_pods=(pod("Failed", exit_code=1, message="Traceback: boom", container="validate"),))
        decision = reconcile.reconcile(observed, settings)
        assert condition(decision, "Failed")["reason"] == "ValidationError"
        assert "Traceback: boom" in condition(decision, "Failed")["message"]

    def test_a_passed_validation_creates_the_trainer_job(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(make_job(), settings,
                                 validation_job=job_with_conditions("demo-validate", ("Complete", "Completed")))
        decision = reconcile.reconcile(observed, settings)
        assert condition(decision, "Validated")["status"] == "True"
        assert created_kinds(decision) == ["Job/demo-train"]
        assert condition(decision, "Running")["reason"] == "Pending"

    def test_a_validation_pod_that_succeeded_starts_training_before_the_job_controller_marks_its_job(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        # The Job controller writes Complete about a second after the pod ends (it batches pod updates).
        summary = json.dumps({"outcome": "validated", "message": "120 train / 15 validation / 15 test examples"})
        observed = with_children(make_job(), settings, validation_job=job_with_conditions("demo-validate"),
                                 validation_pods=(pod("Succeeded", exit_code=0, message=summary, container="validate"),))
        decision = reconcile.reconcile(observed, settings)
        assert condition(decision, "Validated")["status"] == "True"
        assert "120 train" in condition(decision, "Validated")["message"]
        assert created_kinds(decision) == ["Job/demo-train"]

    @pytest.mark.parametrize("phase, exit_code, outcome", [
        ("Running", 0, "validated"),   # the container ended, the pod is not done (the kubelet has not said so)
        ("Succeeded", 0, "failed"),    # not the trainer's word that the data is valid
        ("Failed", 78, "validated"),
    ])
    def test_anything_short_of_a_validated_pod_that_succeeded_waits_for_the_job(
            self, make_job: MakeJob, settings: OperatorSettings, phase: str, exit_code: int, outcome: str) -> None:
        summary = json.dumps({"outcome": outcome, "message": "m"})
        observed = with_children(make_job(), settings, validation_job=job_with_conditions("demo-validate"),
                                 validation_pods=(pod(phase, exit_code=exit_code, message=summary, container="validate"),))
        decision = reconcile.reconcile(observed, settings)
        assert "Job/demo-train" not in created_kinds(decision)
        assert condition(decision, "Validated")["reason"] == "ValidatingDataset"

    def test_a_spec_change_while_validating_restarts_validation(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        stale = job_with_conditions("demo-validate")
        stale["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH] = "old"
        decision = reconcile.reconcile(with_children(make_job(), settings, validation_job=stale), settings)
        assert DeleteChild("batch/v1", "Job", "demo-validate") in decision.actions
        assert created_kinds(decision) == []


class TestTraining:
    def test_a_running_pod_means_running(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(make_job(status=validated_status()), settings,
                                 trainer_job=job_with_conditions("demo-train", active=1,
                                                                 startTime="2026-03-01T11:00:00Z"),
                                 trainer_pods=(pod("Running"),))
        decision = reconcile.reconcile(observed, settings)
        assert (condition(decision, "Running")["status"], condition(decision, "Running")["reason"]) == (
            "True", "Training")
        assert decision.status_patch["startTime"] == "2026-03-01T11:00:00Z"
        assert decision.status_patch["attempts"] == 1
        assert decision.actions == ()

    def test_a_retryable_failure_is_reported_as_resuming(self, make_job: MakeJob,
                                                         settings: OperatorSettings) -> None:
        observed = with_children(
            make_job(status=validated_status()), settings,
            trainer_job=job_with_conditions("demo-train", active=1, failed=1),
            trainer_pods=(pod("Failed", exit_code=1, message="CUDA error"), pod("Pending", attempt=1)))
        decision = reconcile.reconcile(observed, settings)
        running = condition(decision, "Running")
        assert (running["status"], running["reason"]) == ("False", "Resuming")
        assert "attempt 1 resumes from the latest checkpoint after exit code 1: CUDA error" == running["message"]
        assert decision.status_patch["attempts"] == 2

    def test_success_fills_the_status_from_the_termination_message(self, make_job: MakeJob,
                                                                   settings: OperatorSettings) -> None:
        summary = {"outcome": "succeeded", "step": 120, "valLoss": 1.25, "results": {"perplexity": 3.5},
                   "modelDigest": "sha256:abc", "message": "done",
                   "resolved": {"batchSize": 8, "learningRate": 0.0002, "automatic": ["batchSize"]}}
        observed = with_children(
            make_job(status=validated_status()), settings,
            trainer_job=job_with_conditions("demo-train", ("Complete", "CompletionsReached"), succeeded=1,
                                            completionTime="2026-03-01T11:30:00Z"),
            trainer_pods=(pod("Succeeded", exit_code=0, message=json.dumps(summary)),))
        decision = reconcile.reconcile(observed, settings)
        patch = decision.status_patch
        assert condition(decision, "Succeeded")["status"] == "True"
        assert patch["phase"] == "Succeeded"
        assert condition(decision, "Failed")["status"] == "False"
        assert condition(decision, "Running")["status"] == "False"
        assert patch["model"] == {"uri": "pvc://models/finetunes/demo/model", "digest": "sha256:abc"}
        assert patch["results"] == {"perplexity": 3.5}
        assert patch["resolved"] == {"batchSize": 8, "learningRate": 0.0002, "automatic": ["batchSize"]}
        assert patch["progress"]["step"] == 120 and patch["progress"]["percent"] == 100.0
        assert patch["metrics"] == {"valLoss": 1.25}
        assert patch["completionTime"] == "2026-03-01T11:30:00Z"

    def test_a_permanent_error_fails_at_once_with_the_trainers_message(self, make_job: MakeJob,
                                                                       settings: OperatorSettings) -> None:
        observed = with_children(
            make_job(status=validated_status()), settings,
            trainer_job=job_with_conditions("demo-train", ("Failed", "PodFailurePolicy"), failed=1),
            trainer_pods=(pod("Failed", exit_code=78, message=json.dumps({"message": "model.source: not found"})),))
        decision = reconcile.reconcile(observed, settings)
        failed = condition(decision, "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "PermanentError")
        assert failed["message"] == "the trainer stopped with a permanent error (no retry): model.source: not found"

    def test_exhausted_retries_fail_with_backoff_limit_exceeded(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        observed = with_children(
            make_job(status=validated_status()), settings,
            trainer_job=job_with_conditions("demo-train", ("Failed", "FailedIndexes"),
                                            spec={"backoffLimitPerIndex": 2}, failed=3),
            trainer_pods=(pod("Failed", exit_code=137, message="OOMKilled", attempt=2),))
        decision = reconcile.reconcile(observed, settings)
        assert condition(decision, "Failed")["reason"] == "BackoffLimitExceeded"
        assert condition(decision, "Failed")["message"] == "retryable failures used up backoffLimit (2); last: OOMKilled"

    def test_deadline(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(
            make_job(status=validated_status()), settings,
            trainer_job=job_with_conditions("demo-train", ("Failed", "DeadlineExceeded"),
                                            spec={"activeDeadlineSeconds": 60}))
        assert condition(reconcile.reconcile(observed, settings), "Failed")["reason"] == "DeadlineExceeded"


class TestSuspendAndResume:
    def test_suspending_patches_the_trainer_job_and_reports_suspended(self, make_job: MakeJob,
                                                                      settings: OperatorSettings) -> None:
        observed = with_children(make_job(suspend=True, status=validated_status()), settings,
                                 trainer_job=job_with_conditions("demo-train", spec={"suspend": False}, active=1),
                                 trainer_pods=(pod("Running"),))
        decision = reconcile.reconcile(observed, settings)
        assert PatchChild("batch/v1", "Job", "demo-train", {"spec": {"suspend": True}}) in decision.actions
        assert condition(decision, "Suspended")["status"] == "True"
        assert condition(decision, "Running")["status"] == "False"

    def test_resuming_unsuspends_the_trainer_job(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(make_job(suspend=False, status=validated_status()), settings,
                                 trainer_job=job_with_conditions("demo-train", ("Suspended", "JobSuspended"),
                                                                 spec={"suspend": True}))
        decision = reconcile.reconcile(observed, settings)
        assert PatchChild("batch/v1", "Job", "demo-train", {"spec": {"suspend": False}}) in decision.actions
        assert condition(decision, "Suspended")["status"] == "False"

    def test_with_a_queue_the_operator_never_unsuspends(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        observed = with_children(make_job(resources={"queueName": "q"}, status=validated_status()), settings,
                                 trainer_job=job_with_conditions("demo-train", spec={"suspend": True}))
        assert reconcile.reconcile(observed, settings).actions == ()


    def test_a_queued_job_suspended_from_the_start_gets_its_trainer_job_only_when_resumed(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        """Kueue would admit a new queued Job before the operator could deactivate its Workload."""
        suspended = reconcile.reconcile(with_children(make_job(suspend=True, resources={"queueName": "q"},
                                                               status=validated_status()), settings), settings)
        assert "Job/demo-train" not in created_kinds(suspended)
        assert condition(suspended, "Suspended")["status"] == "True"
        assert (condition(suspended, "Running")["status"], condition(suspended, "Running")["reason"]) == (
            "False", "SuspendedByUser")
        resumed = reconcile.reconcile(with_children(make_job(suspend=False, resources={"queueName": "q"},
                                                             status=validated_status()), settings), settings)
        assert "Job/demo-train" in created_kinds(resumed)
        # Without a queue the suspended Job is created suspended, as before: nothing admits it behind our back.
        plain = reconcile.reconcile(with_children(make_job(suspend=True, status=validated_status()), settings),
                                    settings)
        assert "Job/demo-train" in created_kinds(plain)


def workload(name: str = "job-demo-train-1a2b3", *, active: bool = True, ours: bool = False,
             **condition_reasons: tuple[str, str, str]) -> dict[str, Any]:
    """A Kueue Workload as Kueue writes it; `condition_reasons` maps a condition type to (status, reason, message)."""
    annotations = {reconcile.ANNOTATION_DEACTIVATED: "spec.suspend"} if ours else {}
    return {"metadata": {"name": name, "annotations": annotations}, "spec": {"active": active},
            "status": {"conditions": [{"type": t, "status": st, "reason": r, "message": m}
                                      for t, (st, r, m) in condition_reasons.items()]}}


class TestKueue:
    """With `resources.queueName` Kueue owns the trainer Job's `suspend`: status says whether Kueue or the
    user holds the job, and the user's suspend goes through the Workload, never against Kueue."""

    def queued(self, make_job: MakeJob, settings: OperatorSettings, *, suspend: bool, job_suspended: bool,
               workloads: tuple[dict[str, Any], ...], pods: tuple[dict[str, Any], ...] = ()) -> reconcile.Decision:
        observed = with_children(make_job(suspend=suspend, resources={"queueName": "team-a"},
                                          status=validated_status()), settings,
                                 trainer_job=job_with_conditions("demo-train", spec={"suspend": job_suspended}),
                                 trainer_pods=pods, kueue_workloads=workloads)
        return reconcile.reconcile(observed, settings)

    def test_a_job_kueue_has_not_admitted_is_reported_queued_by_kueue_with_its_local_queue(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = self.queued(make_job, settings, suspend=False, job_suspended=True, workloads=(workload(
            QuotaReserved=("False", "Pending", "couldn't assign flavors to pod set main: insufficient quota")),))
        running = condition(decision, "Running")
        assert (running["status"], running["reason"]) == ("False", "QueuedByKueue")
        assert running["message"] == ("waiting for Kueue to admit the trainer Job from LocalQueue team-a: "
                                      "couldn't assign flavors to pod set main: insufficient quota")
        assert condition(decision, "Suspended")["status"] == "False", "the user did not suspend it"
        assert decision.actions == (), "Kueue unsuspends it, not the operator"
        assert decision.status_patch["phase"] == "Pending"

    def test_a_job_kueue_evicted_says_so_and_is_not_unsuspended_by_the_operator(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = self.queued(make_job, settings, suspend=False, job_suspended=True, workloads=(workload(
            Evicted=("True", "Preempted", "Preempted to accommodate a workload (UID: 1) due to prioritization"),
            QuotaReserved=("False", "Pending", "Preempted")),), pods=(pod("Failed", exit_code=143),))
        running = condition(decision, "Running")
        assert running["reason"] == "QueuedByKueue"
        assert running["message"].startswith("evicted by Kueue (Preempted: Preempted to accommodate a workload")
        assert "LocalQueue team-a" in running["message"] and "resumes from the latest" in running["message"]
        assert decision.actions == ()

    def test_after_a_resume_the_deactivation_is_not_reported_as_an_eviction(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = self.queued(make_job, settings, suspend=False, job_suspended=True, workloads=(workload(
            Evicted=("True", "Deactivated", "The workload is deactivated"),
            QuotaReserved=("False", "Pending", "couldn't assign flavors to pod set main: insufficient quota")),))
        running = condition(decision, "Running")
        assert running["reason"] == "QueuedByKueue"
        assert running["message"] == ("waiting for Kueue to admit the trainer Job from LocalQueue team-a: "
                                      "couldn't assign flavors to pod set main: insufficient quota")

    def test_the_users_suspend_deactivates_the_workload_and_leaves_the_job_to_kueue(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = self.queued(make_job, settings, suspend=True, job_suspended=False,
                               workloads=(workload(QuotaReserved=("True", "QuotaReserved", "")),),
                               pods=(pod("Running"),))
        assert decision.actions == (PatchChild(reconcile.KUEUE_API_VERSION, "Workload", "job-demo-train-1a2b3", {
            "metadata": {"annotations": {reconcile.ANNOTATION_DEACTIVATED: "spec.suspend"}},
            "spec": {"active": False}}),), "no patch of the Job: Kueue would unsuspend it at once"
        assert (condition(decision, "Suspended")["status"], condition(decision, "Suspended")["reason"]) == (
            "True", "SuspendedByUser")
        assert condition(decision, "Running")["reason"] == "SuspendedByUser"

    def test_resuming_reactivates_only_the_workload_the_operator_deactivated(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        ours = self.queued(make_job, settings, suspend=False, job_suspended=True,
                           workloads=(workload(active=False, ours=True),))
        assert ours.actions == (PatchChild(reconcile.KUEUE_API_VERSION, "Workload", "job-demo-train-1a2b3", {
            "metadata": {"annotations": {reconcile.ANNOTATION_DEACTIVATED: None}}, "spec": {"active": True}}),)
        kueues = self.queued(make_job, settings, suspend=False, job_suspended=True,
                             workloads=(workload(active=False, ours=False),))
        assert kueues.actions == (), "a Workload Kueue deactivated itself stays deactivated"

    def test_a_suspended_job_already_deactivated_needs_nothing(self, make_job: MakeJob,
                                                               settings: OperatorSettings) -> None:
        decision = self.queued(make_job, settings, suspend=True, job_suspended=True,
                               workloads=(workload(active=False, ours=True),))
        assert decision.actions == ()
        assert condition(decision, "Suspended")["reason"] == "SuspendedByUser"

    def test_without_a_workload_yet_suspending_patches_the_job_and_nothing_unsuspends_it(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        suspending = self.queued(make_job, settings, suspend=True, job_suspended=False, workloads=())
        assert suspending.actions == (PatchChild("batch/v1", "Job", "demo-train", {"spec": {"suspend": True}}),)
        waiting = self.queued(make_job, settings, suspend=False, job_suspended=True, workloads=())
        assert waiting.actions == ()
        assert condition(waiting, "Running")["message"] == "waiting for Kueue to admit the trainer Job from LocalQueue team-a"


class TestFinishedJobs:
    def finished(self, make_job: MakeJob, **spec: Any) -> dict[str, Any]:
        status = validated_status()
        status["conditions"].append({"type": "Succeeded", "status": "True", "reason": "TrainingComplete",
                                     "message": "", "observedGeneration": 1, "lastTransitionTime": "x"})
        status["completionTime"] = "2026-03-01T11:00:00Z"
        return make_job(status=status, **spec)

    def test_children_are_removed_once_the_ttl_passed_and_the_job_stays(self, make_job: MakeJob,
                                                                        settings: OperatorSettings) -> None:
        observed = with_children(self.finished(make_job, ttlSecondsAfterFinished=600), settings,
                                 trainer_job=job_with_conditions("demo-train"),
                                 validation_job=job_with_conditions("demo-validate"))
        decision = reconcile.reconcile(observed, settings)
        assert set(decision.actions) == {
            DeleteChild("batch/v1", "Job", "demo-train"), DeleteChild("batch/v1", "Job", "demo-validate"),
            DeleteChild("v1", "ConfigMap", "demo-config"), DeleteChild("v1", "Secret", "demo-progress")}
        assert "TrainingChildrenRemoved" in [e.reason for e in decision.events]

    def test_before_the_ttl_nothing_is_removed_and_a_requeue_is_asked(self, make_job: MakeJob,
                                                                      settings: OperatorSettings) -> None:
        observed = with_children(self.finished(make_job, ttlSecondsAfterFinished=7200), settings,
                                 trainer_job=job_with_conditions("demo-train"))
        decision = reconcile.reconcile(observed, settings)
        assert decision.actions == ()
        assert decision.requeue_after == 3600.0

    def test_a_finished_job_never_recreates_children(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        decision = reconcile.reconcile(Observed(job=self.finished(make_job), now=NOW), settings)
        assert decision.actions == ()


def test_state_words_for_metrics() -> None:
    def status(*pairs: tuple[str, str]) -> dict[str, Any]:
        return {"conditions": [{"type": t, "status": s} for t, s in pairs]}
    assert reconcile.state_of(status()) == "Validating"
    assert reconcile.state_of(status(("Validated", "True"))) == "Pending"
    assert reconcile.state_of(status(("Validated", "True"), ("Running", "True"))) == "Running"
    assert reconcile.state_of(status(("Suspended", "True"))) == "Suspended"
    assert reconcile.state_of(status(("Failed", "True"))) == "Failed"
    assert reconcile.state_of(status(("Succeeded", "True"))) == "Succeeded"


class TestTransitionEvents:
    """One Event per transition, not one per condition: half of the operator's API requests were Events."""

    @staticmethod
    def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, str]:
        return {"type": type_, "status": status, "reason": reason, "message": message}

    def test_conditions_a_transition_moves_together_make_one_event_naming_each(self) -> None:
        c = self.condition
        events = reconcile.transition_events([
            c("Succeeded", "True", "TrainingComplete", "trained 10 steps"), c("Failed", "False", "TrainingComplete"),
            c("Running", "False", "TrainingComplete", "training ended")])
        assert [(e.type, e.reason) for e in events] == [("Normal", "TrainingComplete")]
        assert events[0].message == "Succeeded=True: trained 10 steps (also Failed=False, Running=False)"

    def test_a_transition_makes_one_normal_event_naming_the_other_reasons(self) -> None:
        c = self.condition
        events = reconcile.transition_events([
            c("Validated", "True", "DatasetValid", "dataset validated: 8 examples"),
            c("Running", "False", "Pending", "waiting for the trainer pod to start"),
            c("ServingReady", "False", "ServingDisabled", "spec.serving.enabled is false")])
        assert [(e.type, e.reason) for e in events] == [("Normal", "DatasetValid")]
        assert events[0].message == ("Validated=True: dataset validated: 8 examples "
                                     "(also Running=False Pending, ServingReady=False ServingDisabled)")

    def test_quiet_false_conditions_make_no_event_and_warnings_lead(self) -> None:
        c = self.condition
        events = reconcile.transition_events([
            c("Succeeded", "False", "NotFinished"), c("Failed", "False", "NotFinished"),
            c("Suspended", "False", "NotSuspended"), c("Stalled", "False", "NotTraining"),
            c("Running", "False", "QuotaExceeded", "1 of 1 concurrent jobs running"),
            c("Validated", "False", "InvalidSpec", "spec.model.source: required"),
            c("Failed", "True", "InvalidSpec", "spec.model.source: required")])
        assert [(e.type, e.reason) for e in events] == [("Normal", "QuotaExceeded"), ("Warning", "InvalidSpec")]
        assert events[1].message == "Failed=True: spec.model.source: required (also Validated=False)"
