"""Lifecycle edges: a child's name taken by an object the job does not own (a deleted job's leftover
being garbage-collected, or someone else's object) stops the job from creating anything, and a
condition says why, instead of a silent stall or pods that mount the other object."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from kubetune.operator import conditions
from kubetune.operator.jobs import reconcile
from kubetune.operator.jobs.reconcile import Observed
from kubetune.operator.settings import OperatorSettings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]


def config_map(owner_uid: str | None, *, deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "demo-config", "namespace": "team-a", "labels": {}}
    if owner_uid:
        metadata["ownerReferences"] = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                        "name": "demo", "uid": owner_uid, "controller": True}]
    if deleting:
        metadata["deletionTimestamp"] = "2026-03-01T11:59:00Z"
    return {"metadata": metadata}


class TestWhoseChildIsIt:
    def test_only_the_controller_with_this_uid_owns_a_child(self) -> None:
        assert reconcile.controlled_by(config_map("uid-1"), "uid-1")
        assert not reconcile.controlled_by(config_map("uid-0"), "uid-1")
        assert not reconcile.controlled_by(config_map(None), "uid-1")

    def test_the_description_says_whose_it_is(self) -> None:
        old = reconcile.describe_foreign(config_map("uid-0", deleting=True), "ConfigMap", "demo")
        assert old == ("ConfigMap demo-config belongs to an earlier FineTuneJob of this name (uid uid-0) "
                       "and is being deleted")
        assert reconcile.describe_foreign(config_map(None), "ConfigMap", "demo") == \
            "ConfigMap demo-config has no controller (made by someone else)"


class TestNothingIsCreatedAroundAForeignChild:
    def test_a_leftover_of_a_deleted_job_makes_the_new_one_wait(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        leftover = reconcile.describe_foreign(config_map("uid-0", deleting=True), "ConfigMap", "demo")
        decision = reconcile.reconcile(Observed(job=make_job(), now=NOW, foreign_children=(leftover,)), settings)
        assert decision.actions == ()  # above all no validation/trainer Job mounting the old ConfigMap
        running = conditions.find(decision.status_patch["conditions"], conditions.RUNNING)
        assert running is not None and running["reason"] == "WaitingForOldChildren"
        assert "uid-0" in running["message"]
        assert decision.requeue_after == reconcile.FOREIGN_RETRY_SECONDS

    def test_someone_elses_object_is_named_in_a_condition(self, make_job: MakeJob,
                                                          settings: OperatorSettings) -> None:
        squatter = reconcile.describe_foreign(config_map(None), "Secret", "demo")
        decision = reconcile.reconcile(Observed(job=make_job(), now=NOW, foreign_children=(squatter,)), settings)
        assert decision.actions == ()
        running = conditions.find(decision.status_patch["conditions"], conditions.RUNNING)
        assert running is not None and running["status"] == "False"
        assert running["reason"] == "ChildNameConflict"
        assert running["message"].startswith("Secret demo-config has no controller")
        assert "delete or rename it" in running["message"]

    def test_a_finished_job_says_so_on_serving(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        done = {"conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingComplete",
                                "message": "", "observedGeneration": 1, "lastTransitionTime": "x"}]}
        squatter = "Service demo-serve has no controller (made by someone else)"
        job = make_job(serving={"enabled": True}, status=done)
        decision = reconcile.reconcile(Observed(job=job, now=NOW, foreign_children=(squatter,)), settings)
        assert decision.actions == ()
        serving = conditions.find(decision.status_patch["conditions"], conditions.SERVING_READY)
        assert serving is not None and serving["reason"] == "ChildNameConflict"
