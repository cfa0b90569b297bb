"""Stalled training: a running trainer whose step stays the same for training.stallTimeoutSeconds."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from kubetune.operator import conditions
from kubetune.operator.jobs import reconcile
from kubetune.operator.jobs.reconcile import DeleteChild, Observed
from kubetune.operator.platform.policy import NamespaceLimits, PlatformPolicy
from kubetune.operator.settings import OperatorSettings
from tests.unit.operator.test_operator_reconcile import (NOW, condition, job_with_conditions, pod, validated_status,
                                                         with_children)

MakeJob = Callable[..., dict[str, Any]]
RESTARTING = PlatformPolicy(defaults=NamespaceLimits(restart_stalled_training=True))


def running(make_job: MakeJob, settings: OperatorSettings, *, step: int, last: dict[str, Any] | None,
            seconds_later: float = 0, timeout: int = 300, started_at: int | None = None,
            attempt: int = 0) -> Observed:
    progress: dict[str, Any] = {"step": step}
    if started_at is not None:  # the pod's own started report was merged: attempt and startStep
        progress |= {"attempt": attempt, "startStep": started_at}
    status = validated_status() | {"progress": progress}
    if last is not None:
        status["lastProgress"] = last
    job = make_job(status=status, training={"stallTimeoutSeconds": timeout})
    observed = with_children(job, settings, trainer_job=job_with_conditions("demo-train", active=1),
                             trainer_pods=(pod("Running", attempt=attempt),))
    return dataclasses.replace(observed, now=NOW + timedelta(seconds=seconds_later))


SEEN = {"pod": "p-0-Running", "step": 7, "time": "2026-03-01T12:00:00Z", "armed": True}


def test_a_new_step_of_the_pod_starts_the_clock(make_job: MakeJob, settings: OperatorSettings) -> None:
    decision = reconcile.reconcile(running(make_job, settings, step=7, last=SEEN | {"step": 6}), settings)
    assert decision.status_patch["lastProgress"] == SEEN
    assert (condition(decision, "Stalled")["status"], condition(decision, "Stalled")["reason"]) == (
        "False", conditions.PROGRESSING)


def test_a_pod_that_has_not_moved_the_step_yet_is_loading_not_stalled(make_job: MakeJob,
                                                                       settings: OperatorSettings) -> None:
    first = reconcile.reconcile(running(make_job, settings, step=7, last=None), settings)
    assert first.status_patch["lastProgress"] == SEEN | {"armed": False}
    later = reconcile.reconcile(running(make_job, settings, step=7, last=SEEN | {"armed": False},
                                        seconds_later=10_000), settings)
    assert condition(later, "Stalled")["status"] == "False"
    assert "waiting for the first step of pod p-0-Running" in condition(later, "Stalled")["message"]


def test_a_pod_first_seen_after_its_own_reports_moved_the_step_is_armed_at_once(
        make_job: MakeJob, settings: OperatorSettings) -> None:
    # A fast trainer: it was at step 7 (from 0) before the operator first saw its pod running, then froze.
    first = reconcile.reconcile(running(make_job, settings, step=7, last=None, started_at=0), settings)
    assert first.status_patch["lastProgress"] == SEEN
    frozen = reconcile.reconcile(running(make_job, settings, step=7, last=SEEN, started_at=0, seconds_later=301),
                                 settings)
    assert condition(frozen, "Stalled")["status"] == "True"


def test_a_resumed_pod_is_waiting_until_it_moves_past_its_checkpoint(make_job: MakeJob,
                                                                     settings: OperatorSettings) -> None:
    # Attempt 1 reported `started` at its checkpoint, step 4: a different step than its predecessor's 7,
    # but not one it has moved to.
    resumed = running(make_job, settings, step=4, last=SEEN, started_at=4, attempt=1, seconds_later=900)
    decision = reconcile.reconcile(resumed, settings)
    assert decision.status_patch["lastProgress"] == {"pod": "p-1-Running", "step": 4, "time": "2026-03-01T12:15:00Z",
                                                     "armed": False}
    assert "waiting for the first step" in condition(decision, "Stalled")["message"]


def test_within_the_timeout_nothing_is_stalled_and_nothing_is_written(make_job: MakeJob,
                                                                     settings: OperatorSettings) -> None:
    decision = reconcile.reconcile(running(make_job, settings, step=7, last=SEEN, seconds_later=299), settings)
    assert condition(decision, "Stalled")["status"] == "False"
    assert "lastProgress" not in decision.status_patch


def test_past_the_timeout_the_job_is_stalled_with_a_warning(make_job: MakeJob, settings: OperatorSettings) -> None:
    observed = running(make_job, settings, step=7, last=SEEN, seconds_later=301)
    decision = reconcile.reconcile(observed, settings)
    stalled = condition(decision, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", conditions.NO_PROGRESS)
    assert "stayed at step 7 since 2026-03-01T12:00:00Z" in stalled["message"]
    assert "stallTimeoutSeconds (300s)" in stalled["message"]
    assert [e.type for e in decision.events if e.reason == conditions.NO_PROGRESS] == ["Warning"]
    assert not any(isinstance(a, DeleteChild) for a in decision.actions)
    # Still running: a stall is a warning, not an outcome.
    assert condition(decision, "Running")["status"] == "True"


def test_the_policy_restarts_a_stalled_pod_from_its_checkpoint(make_job: MakeJob, settings: OperatorSettings) -> None:
    observed = running(make_job, settings, step=7, last=SEEN, seconds_later=301)
    decision = reconcile.reconcile(observed, settings, RESTARTING)
    assert DeleteChild("v1", "Pod", "p-0-Running", grace_seconds=reconcile.STALL_GRACE_SECONDS) in decision.actions
    assert condition(decision, "Stalled")["reason"] == conditions.STALL_RESTART


def test_a_new_step_or_a_new_pod_restarts_the_clock(make_job: MakeJob, settings: OperatorSettings) -> None:
    advanced = reconcile.reconcile(running(make_job, settings, step=8, last=SEEN, seconds_later=900), settings)
    assert condition(advanced, "Stalled")["status"] == "False"
    assert advanced.status_patch["lastProgress"]["step"] == 8
    replaced = reconcile.reconcile(running(make_job, settings, step=7, last=SEEN | {"pod": "old"},
                                           seconds_later=900), settings)
    assert condition(replaced, "Stalled")["status"] == "False"


def restarted(observed: Observed) -> Observed:
    """The same observation after the operator deleted a stalled pod: status says so."""
    job = observed.job
    job["status"]["conditions"] = list(job["status"]["conditions"]) + [{
        "type": "Stalled", "status": "True", "reason": conditions.STALL_RESTART,
        "message": "the trainer pod p-0-Running has stayed at step 7 ...; deleted it", "observedGeneration": 1,
        "lastTransitionTime": "2026-03-01T12:05:00Z"}]
    return observed


def test_stalled_stays_true_until_the_replacement_moves_past_its_checkpoint(make_job: MakeJob,
                                                                           settings: OperatorSettings) -> None:
    waiting = restarted(running(make_job, settings, step=4, last=SEEN, started_at=4, attempt=1, seconds_later=400))
    decision = reconcile.reconcile(waiting, settings, RESTARTING)
    assert (condition(decision, "Stalled")["status"], condition(decision, "Stalled")["reason"]) == (
        "True", conditions.STALL_RESTART)
    assert not any(isinstance(a, DeleteChild) for a in decision.actions)  # the replacement is not deleted
    moved = restarted(running(make_job, settings, step=5, last=SEEN | {"pod": "p-1-Running", "step": 4,
                                                                        "armed": False},
                              started_at=4, attempt=1, seconds_later=420))
    decision = reconcile.reconcile(moved, settings, RESTARTING)
    assert (condition(decision, "Stalled")["status"], condition(decision, "Stalled")["reason"]) == (
        "False", conditions.PROGRESSING)


def test_stalled_stays_true_while_the_replacement_pod_is_pending(make_job: MakeJob,
                                                                 settings: OperatorSettings) -> None:
    observed = running(make_job, settings, step=7, last=SEEN, seconds_later=400)
    pending = restarted(dataclasses.replace(observed, trainer_pods=(pod("Pending", attempt=1),)))
    decision = reconcile.reconcile(pending, settings, RESTARTING)
    assert condition(decision, "Stalled")["status"] == "True"


def test_off_by_default(make_job: MakeJob, settings: OperatorSettings) -> None:
    observed = running(make_job, settings, step=7, last=SEEN, seconds_later=10_000, timeout=0)
    decision = reconcile.reconcile(observed, settings)
    assert conditions.find(decision.status_patch["conditions"], "Stalled") is None


def test_the_field_is_the_operators_own_and_not_passed_to_the_trainer(make_job: MakeJob) -> None:
    from kubetune.operator.jobs import render

    rendered = render.trainer_config_for(make_job(training={"stallTimeoutSeconds": 60, "evalInterval": 5}))
    assert rendered.config["training"] == {"evalInterval": 5}
