"""Multi-tenant quota: the platform policy file, level-based accounting, and who may start when."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, Observed, PatchChild
from kubetune.operator.platform import policy, quota
from kubetune.operator.platform.policy import NamespaceLimits, PlatformPolicy, PolicyError
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]
VALIDATED = {"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "",
             "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"}


class TestThePolicyFile:
    def test_the_charts_format_with_per_namespace_overrides(self, tmp_path: Path) -> None:
        path = tmp_path / "policy.yaml"
        path.write_text("apiVersion: kubetune.io/v1alpha1\nkind: PlatformPolicy\n"
                        "defaults: {maxConcurrentJobs: 1, allowedModelSources: ['pvc://*']}\n"
                        "namespaces:\n  team-a: {maxTotalGpus: 8}\n")
        loaded = policy.load_policy(str(path))
        assert loaded.limits_for("team-a") == NamespaceLimits(max_concurrent_jobs=1, max_total_gpus=8,
                                                              allowed_model_sources=("pvc://*",))
        assert loaded.limits_for("elsewhere") == NamespaceLimits(max_concurrent_jobs=1,
                                                                 allowed_model_sources=("pvc://*",))

    def test_no_file_means_no_limits(self) -> None:
        assert policy.load_policy("") == policy.NO_POLICY
        assert not policy.NO_POLICY.limits_for("any").limits_running_jobs

    def test_every_problem_is_named_by_field(self) -> None:
        with pytest.raises(PolicyError) as caught:
            policy.policy_from_dict({"defaults": {"maxConcurrentJobs": -1, "maxGpus": 2},
                                     "namespaces": {"team-a": {"allowedModelSources": "hf://*"}}})
        text = str(caught.value)
        assert "defaults.maxConcurrentJobs: must be an integer >= 0" in text
        assert "defaults.maxGpus: unknown key" in text
        assert "namespaces.team-a.allowedModelSources: must be a list" in text

    def test_an_unreadable_file_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(PolicyError, match="cannot be read"):
            policy.load_policy(str(tmp_path / "missing.yaml"))

    def test_globs_match_across_slashes(self) -> None:
        limits = NamespaceLimits(allowed_model_sources=("hf://meta-llama/*", "pvc://models/*"))
        assert limits.model_source_allowed("hf://meta-llama/Llama-3.1-8B")
        assert limits.model_source_allowed("pvc://models/base/deep/gpt2")
        assert not limits.model_source_allowed("hf://someone/else")


def usage(name: str, created: str, gpus: int = 1, holding: bool = False, waiting: bool = False) -> quota.Usage:
    return quota.Usage(name=name, created=created, gpus=gpus, holding=holding, waiting=waiting)


class TestAdmission:
    LIMITS = NamespaceLimits(max_concurrent_jobs=2, max_total_gpus=4)

    def test_a_job_starts_while_there_is_room(self) -> None:
        me = usage("c", "2026-03-01T10:02:00Z", waiting=True)
        assert quota.admit(me, [usage("a", "2026-03-01T10:00:00Z", holding=True)], self.LIMITS).admitted

    def test_a_job_beyond_the_concurrency_limit_waits_with_the_reason(self) -> None:
        me = usage("c", "2026-03-01T10:02:00Z", waiting=True)
        running = [usage("a", "1", holding=True), usage("b", "2", holding=True)]
        admission = quota.admit(me, running, self.LIMITS)
        assert not admission.admitted
        assert admission.message == ("namespace quota: 2 of 2 concurrent jobs running (maxConcurrentJobs), "
                                     "2 of 4 GPUs held (maxTotalGpus); starts when room frees up")

    def test_gpus_count_too(self) -> None:
        me = usage("c", "3", gpus=2, waiting=True)
        assert not quota.admit(me, [usage("a", "1", gpus=3, holding=True)], self.LIMITS).admitted
        assert quota.admit(me, [usage("a", "1", gpus=2, holding=True)], self.LIMITS).admitted

    def test_the_oldest_waiting_job_goes_first_and_ties_break_by_name(self) -> None:
        running = [usage("a", "2026-03-01T10:00:00Z", holding=True)]
        older = usage("b", "2026-03-01T10:01:00Z", waiting=True)
        younger = usage("c", "2026-03-01T10:02:00Z", waiting=True)
        assert quota.admit(older, running + [younger], self.LIMITS).admitted
        blocked = quota.admit(younger, running + [older], self.LIMITS)
        assert not blocked.admitted and "waiting behind older job(s) b;" in blocked.message
        same_time = [usage("x", "2026-03-01T10:01:00Z", waiting=True)]
        assert quota.admit(usage("w", "2026-03-01T10:01:00Z", waiting=True), running + same_time,
                           self.LIMITS).admitted
        assert not quota.admit(same_time[0], running + [usage("w", "2026-03-01T10:01:00Z", waiting=True)],
                               self.LIMITS).admitted

    def test_a_job_that_can_never_fit_waits_without_blocking_others(self) -> None:
        limits = NamespaceLimits(max_concurrent_jobs=2, max_gpus_per_job=2)
        huge = usage("a", "1", gpus=8, waiting=True)
        never = quota.admit(huge, [], limits)
        assert not never.admitted and "at most 2 per job are allowed (maxGpusPerJob)" in never.message
        assert quota.admit(usage("b", "2", waiting=True), [huge], limits).admitted


def finished_trainer(name: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{name}-train", "labels": {builders.LABEL_INSTANCE: name}},
            "spec": {"suspend": False},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}}


SPEC = {"model": {"source": "pvc://models/base/gpt2"}, "dataset": {"train": {"source": "pvc://data/train.jsonl"}},
        "output": {"storage": "pvc://models/finetunes"}}


class TestAccountingFromTheCluster:
    def ftj(self, name: str, created: str, **spec: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "creationTimestamp": created},
                "spec": {**SPEC, "resources": {"gpus": 1}, **spec}, "status": {"conditions": [VALIDATED]}}

    def trainer(self, name: str, suspend: bool, active: int = 0) -> dict[str, Any]:
        return {"metadata": {"name": f"{name}-train", "labels": {builders.LABEL_INSTANCE: name}},
                "spec": {"suspend": suspend}, "status": {"active": active}}

    def test_running_finished_waiting_suspended_and_queued_jobs(self) -> None:
        jobs = (self.ftj("running", "1"), self.ftj("done", "2"), self.ftj("waiting", "3"),
                self.ftj("paused", "4", suspend=True), self.ftj("queued", "5", resources={"queueName": "q"}),
                self.ftj("stopping", "6"))
        trainers = (self.trainer("running", False), finished_trainer("done"), self.trainer("waiting", True),
                    self.trainer("paused", True), self.trainer("queued", False),
                    self.trainer("stopping", True, active=1))
        found = {u.name: (u.holding, u.waiting) for u in quota.namespace_usage(jobs, trainers)}
        assert found == {"running": (True, False), "done": (False, False), "waiting": (False, True),
                         "paused": (False, False), "queued": (False, False), "stopping": (True, True)}

    def test_a_validated_job_without_a_trainer_yet_is_waiting(self) -> None:
        assert quota.namespace_usage((self.ftj("new", "1"),), ())[0].waiting

    def test_auto_gpus_count_as_the_estimate_chose_and_a_spec_that_does_not_parse_counts_nothing(self) -> None:
        chosen = self.ftj("chosen", "1", resources={"gpus": "auto", "nodes": 2})
        chosen["status"]["estimate"] = {"gpus": 4}
        unestimated = self.ftj("unestimated", "2", resources={"gpus": "auto"})
        broken = self.ftj("broken", "3", resources={"gpus": -1})
        found = {u.name: (u.gpus, u.holding, u.waiting)
                 for u in quota.namespace_usage((chosen, unestimated, broken), (self.trainer("broken", False),))}
        assert found == {"chosen": (8, False, True), "unestimated": (1, False, True), "broken": (0, False, False)}


def validated_job(make_job: MakeJob, name: str = "demo", created: str = "2026-03-01T10:00:00Z",
                  **spec: Any) -> dict[str, Any]:
    job = make_job(status={"conditions": [dict(VALIDATED)]}, **spec)
    job["metadata"] |= {"name": name, "creationTimestamp": created}
    return job


def running_trainer(job: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    trainer = builders.trainer_job(job, typed(job), render.trainer_config_for(job), settings)
    trainer["status"] = {"active": 1}
    return trainer


ONE_AT_A_TIME = PlatformPolicy(defaults=NamespaceLimits(max_concurrent_jobs=1))


def running_condition(decision: reconcile.Decision) -> dict[str, Any]:
    found = conditions.find(decision.status_patch["conditions"], "Running")
    assert found is not None
    return dict(found)


class TestReconcileUnderQuota:
    def test_a_job_beyond_the_limit_gets_a_suspended_trainer_and_waits_with_quota_exceeded(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        first = validated_job(make_job, "first", "2026-03-01T10:00:00Z")
        second = validated_job(make_job, "second", "2026-03-01T10:05:00Z")
        observed = Observed(job=second, now=NOW, namespace_jobs=(first, second),
                            namespace_trainer_jobs=(running_trainer(first, settings),))
        decision = reconcile.reconcile(observed, settings, ONE_AT_A_TIME)
        created = [a.manifest for a in decision.actions if isinstance(a, CreateChild)
                   and a.manifest["kind"] == "Job"]
        assert [(m["metadata"]["name"], m["spec"]["suspend"]) for m in created] == [("second-train", True)]
        running = running_condition(decision)
        assert (running["status"], running["reason"]) == ("False", "QuotaExceeded")
        assert "1 of 1 concurrent jobs running" in running["message"]
        assert decision.status_patch["phase"] == "Pending"

    def test_the_waiting_job_is_unsuspended_once_the_earlier_one_finished(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        first = validated_job(make_job, "first", "2026-03-01T10:00:00Z")
        second = validated_job(make_job, "second", "2026-03-01T10:05:00Z")
        waiting = builders.trainer_job(second, typed(second), render.trainer_config_for(second), settings,
                                       admitted=False)
        observed = Observed(job=second, now=NOW, trainer_job=waiting, namespace_jobs=(first, second),
                            namespace_trainer_jobs=(finished_trainer("first"), waiting),
                            config_map=builders.trainer_configmap(second, render.trainer_config_for(second)),
                            progress_secret={"metadata": {"name": "second-progress"}})
        decision = reconcile.reconcile(observed, settings, ONE_AT_A_TIME)
        assert decision.actions == (PatchChild("batch/v1", "Job", "second-train", {"spec": {"suspend": False}}),)
        assert running_condition(decision)["reason"] == "Pending"

    def test_a_running_trainer_is_never_stopped_by_quota(self, make_job: MakeJob,
                                                         settings: OperatorSettings) -> None:
        first = validated_job(make_job, "first")
        trainer = running_trainer(first, settings)
        others = copy.deepcopy(trainer)
        others["metadata"]["labels"][builders.LABEL_INSTANCE] = "other"
        observed = Observed(job=first, now=NOW, trainer_job=trainer, namespace_jobs=(first,),
                            namespace_trainer_jobs=(trainer, others),
                            config_map=builders.trainer_configmap(first, render.trainer_config_for(first)),
                            progress_secret={"metadata": {"name": "first-progress"}})
        decision = reconcile.reconcile(observed, settings, ONE_AT_A_TIME)
        assert decision.actions == ()

    def test_a_disallowed_model_source_fails_the_job_before_anything_is_created(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        strict = PlatformPolicy(namespaces={"team-a": NamespaceLimits(allowed_model_sources=("hf://org/*",))})
        decision = reconcile.reconcile(Observed(job=make_job(), now=NOW), settings, strict)
        assert decision.actions == ()
        validated = conditions.find(decision.status_patch["conditions"], "Validated")
        assert validated is not None and (validated["status"], validated["reason"]) == (
            "False", "ModelSourceNotAllowed")
        assert "spec.model.source: 'pvc://models/base/gpt2' is not allowed in namespace team-a" in \
            validated["message"]
        assert decision.status_patch["phase"] == "Failed"

    def test_gpus_per_job_over_the_limit_waits_even_with_a_kueue_queue(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        small = PlatformPolicy(defaults=NamespaceLimits(max_gpus_per_job=1))
        job = validated_job(make_job, resources={"gpus": 4, "queueName": "team-a-queue"})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, small)
        assert not [a for a in decision.actions if isinstance(a, CreateChild) and a.manifest["kind"] == "Job"]
        assert running_condition(decision)["reason"] == "QuotaExceeded"

    def test_a_kueue_job_is_created_suspended_with_the_queue_label_and_skips_our_count(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        first = validated_job(make_job, "first")
        queued = validated_job(make_job, "second", "2026-03-01T10:05:00Z", resources={"queueName": "q"})
        observed = Observed(job=queued, now=NOW, namespace_jobs=(first, queued),
                            namespace_trainer_jobs=(running_trainer(first, settings),))
        decision = reconcile.reconcile(observed, settings, ONE_AT_A_TIME)
        trainer = next(a.manifest for a in decision.actions if isinstance(a, CreateChild)
                       and a.manifest["kind"] == "Job")
        assert trainer["spec"]["suspend"] is True
        assert trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
        assert running_condition(decision)["reason"] == "Pending"

    def test_a_disallowed_serving_image_is_not_deployed(self, make_job: MakeJob,
                                                        settings: OperatorSettings) -> None:
        images = PlatformPolicy(defaults=NamespaceLimits(allowed_serving_images=("registry.corp/*",)))
        job = make_job(serving={"enabled": True, "image": "docker.io/evil:latest"}, status={
            "conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
                            "observedGeneration": 1, "lastTransitionTime": "x"}]})
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, images)
        assert decision.actions == ()
        serving = conditions.find(decision.status_patch["conditions"], "ServingReady")
        assert serving is not None and serving["reason"] == "ImageNotAllowed"
