"""One contract: a job's GPUs per pod, pods and world size are read from its typed spec
(`FineTuneJobSpec`, parsed once per reconcile) by `ResourcesSpec`'s methods only, so the quota, the
trainer Job, the launcher's environment and the estimate all count the same run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions
from kubetune.operator.jobs import reconcile
from kubetune.operator.jobs.reconcile import CreateChild, Observed
from kubetune.operator.platform import estimate, quota
from kubetune.operator.platform.policy import NamespaceLimits, PlatformPolicy
from kubetune.operator.settings import OperatorSettings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]
VALIDATED = {"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "",
             "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"}


def validated(make_job: MakeJob, resources: dict[str, Any], chosen: int | None) -> dict[str, Any]:
    """A validated job asking for `resources`; `chosen`: the GPUs per pod its estimate picked (`auto`)."""
    status: dict[str, Any] = {"conditions": [VALIDATED]}
    if chosen is not None:
        status["estimate"] = {"gpus": chosen}
    job = make_job(resources={"cpu": "4", "memory": "16Gi", **resources}, status=status)
    job["metadata"]["creationTimestamp"] = "2026-03-01T10:00:00Z"
    return job


def trainer_of(decision: reconcile.Decision) -> dict[str, Any]:
    (trainer,) = [a.manifest for a in decision.actions
                  if isinstance(a, CreateChild) and a.manifest["metadata"]["name"] == "demo-train"]
    return trainer


# (resources asked for, the estimate's choice of GPUs per pod, GPUs per pod, pods)
CASES = [({"gpus": 2, "nodes": 3}, None, 2, 3), ({"gpus": "auto", "nodes": 2}, 4, 4, 2),
         ({"gpus": "auto"}, 0, 0, 1)]


@pytest.mark.parametrize(("resources", "chosen", "per_pod", "pods"), CASES,
                         ids=["fixed", "auto-on-gpus", "auto-on-cpu"])
class TestEveryReaderCountsTheSameRun:
    def test_the_trainer_job_the_launcher_and_the_quota_agree(
            self, make_job: MakeJob, settings: OperatorSettings, resources: dict[str, Any], chosen: int | None,
            per_pod: int, pods: int) -> None:
        job = validated(make_job, resources, chosen)
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings)
        trainer = trainer_of(decision)
        pod = trainer["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}

        limit = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", "0"))
        assert (limit, trainer["spec"]["completions"]) == (per_pod, pods)
        assert int(env["KUBETUNE_NUM_PROCESSES"]) * int(env.get("KUBETUNE_NUM_NODES", "1")) == max(1, per_pod) * pods
        # The namespace's quota counts the job (as another job's reconcile sees it) as its trainer holds.
        (usage,) = quota.namespace_usage((job,), ())
        assert usage.gpus == per_pod * pods

    def test_the_quota_refuses_by_the_same_count(
            self, make_job: MakeJob, settings: OperatorSettings, resources: dict[str, Any], chosen: int | None,
            per_pod: int, pods: int) -> None:
        job = validated(make_job, resources, chosen)
        if not per_pod:  # a CPU run holds no GPUs: a quota of none admits it
            limits = NamespaceLimits(max_gpus_per_job=0)
            decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, PlatformPolicy(defaults=limits))
            assert trainer_of(decision)["spec"]["suspend"] is False
            return
        limits = NamespaceLimits(max_gpus_per_job=per_pod * pods - 1)
        decision = reconcile.reconcile(Observed(job=job, now=NOW), settings, PlatformPolicy(defaults=limits))
        running = conditions.find(decision.status_patch["conditions"], conditions.RUNNING)
        assert running is not None and running["reason"] == conditions.QUOTA_EXCEEDED
        assert f"requests {per_pod * pods} GPUs" in running["message"]
        assert trainer_of(decision)["spec"]["suspend"] is True

    def test_the_estimate_sizes_the_world_the_spec_asks_for(
            self, make_job: MakeJob, resources: dict[str, Any], chosen: int | None, per_pod: int, pods: int) -> None:
        spec = FineTuneJobSpec.from_dict(validated(make_job, resources, chosen)["spec"])
        request = estimate.request_of(spec)
        assert request.gpus == ("auto" if resources["gpus"] == "auto" else per_pod)
        # Before its estimate, `auto` is sized as one GPU per pod.
        assert estimate.shape_for(spec, {}, "gpu").world_size == spec.resource_settings().world_size() \
            == (1 if request.gpus == "auto" else per_pod) * pods
        resolved = estimate.with_resolved_gpus(spec.resource_settings(), chosen, 1)
        assert (resolved.gpu_count(), resolved.job_gpus(), resolved.world_size()) == (
            per_pod, per_pod * pods, max(1, per_pod) * pods)


def test_a_spec_that_does_not_parse_fails_naming_the_field_and_creates_nothing(
        make_job: MakeJob, settings: OperatorSettings) -> None:
    job = make_job(resources={"gpus": "two"})
    decision = reconcile.reconcile(Observed(job=job, now=NOW), settings)
    assert decision.actions == ()
    validated_ = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
    assert validated_ is not None and (validated_["status"], validated_["reason"]) == ("False", "InvalidSpec")
    assert validated_["message"].startswith('spec.resources.gpus: must be an integer or "auto"')
    assert decision.status_patch["phase"] == "Failed"


def test_a_finished_job_whose_spec_no_longer_parses_keeps_its_outcome_and_its_children(
        make_job: MakeJob, settings: OperatorSettings) -> None:
    succeeded = {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
                 "observedGeneration": 1, "lastTransitionTime": "2026-03-01T11:00:00Z"}
    job = make_job(status={"conditions": [VALIDATED, succeeded], "completionTime": "2026-03-01T11:00:00Z"},
                   retired={"field": True}, ttlSecondsAfterFinished=0)
    decision = reconcile.reconcile(Observed(job=job, now=NOW, trainer_job={"metadata": {"name": "demo-train"}}),
                                   settings)
    assert decision.actions == ()
    assert decision.status_patch["phase"] == "Succeeded"
    validated_ = conditions.find(decision.status_patch["conditions"], conditions.VALIDATED)
    assert validated_ is not None and validated_["reason"] == "InvalidSpec"
    assert "spec.retired: unknown field" in validated_["message"]
