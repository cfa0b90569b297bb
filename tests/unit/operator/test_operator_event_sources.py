"""Where the FineTuneJob controller's reconciles come from: kopf's FineTuneJob events (only those that
change what a user writes), the informers' child events (only while kopf runs this replica), one pass
waiting per job. The whole path runs against the real API server in
tests/integration/operator/ (lifecycle, missed events, standby takeover)."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import kubernetes
import pytest

from kubetune.operator import cache, metrics
from kubetune.operator.client import KubeClient
from kubetune.operator.jobs import handlers
from kubetune.operator.runtime import RUNTIME
from kubetune.operator.settings import OperatorSettings


def ftj(generation: int = 1, uid: str = "u1", **metadata: Any) -> dict[str, Any]:
    return {"kind": "FineTuneJob", "metadata": {"namespace": "ns", "name": "j", "uid": uid,
                                                "generation": generation, **metadata}}


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The reactions asked for (their keys), none run; fresh event memory and metrics."""
    found: list[tuple[str, ...]] = []
    monkeypatch.setattr(handlers.REACTIONS, "submit", lambda key, work, **_: found.append(key) or True)
    events = handlers._JobEvents()
    monkeypatch.setattr(events, "observed", lambda kind, body, event_type: None)  # no cache to feed
    monkeypatch.setattr(handlers, "EVENTS", events)
    monkeypatch.setattr(RUNTIME, "_metrics", metrics.OperatorMetrics())
    return found


class TestJobChanged:
    def test_first_sight_and_what_a_user_writes_reconcile_status_writes_do_not(self) -> None:
        events = handlers._JobEvents()
        assert events.job_changed(ftj(), None)  # the start-up listing
        assert not events.job_changed({**ftj(), "status": {"phase": "Training"}}, "MODIFIED")  # our own write
        assert events.job_changed(ftj(generation=2), "MODIFIED")  # spec
        assert events.job_changed(ftj(generation=2, labels={"team": "a"}), "MODIFIED")
        assert events.job_changed(ftj(generation=2, labels={"team": "a"},
                                      annotations={"kubetune.io/pruned": "by sweep"}), "MODIFIED")
        assert events.job_changed(ftj(generation=2, labels={"team": "a"}, annotations={"kubetune.io/pruned": "by sweep"},
                                      deletionTimestamp="2026-12-04T00:00:00Z"), "MODIFIED")
        assert events.job_changed(ftj(uid="u2"), "ADDED")  # recreated under the same name

    def test_kopfs_old_diff_base_annotation_is_not_a_change(self) -> None:
        events = handlers._JobEvents()
        assert events.job_changed(ftj(annotations={cache.KOPF_DIFFBASE_ANNOTATION: '{"spec": {}}'}), None)
        assert not events.job_changed(ftj(annotations={cache.KOPF_DIFFBASE_ANNOTATION: '{"spec": {"x": 1}}'}),
                                      "MODIFIED")

    def test_a_deleted_job_is_forgotten(self) -> None:
        events = handlers._JobEvents()
        events.job_changed(ftj(), None)
        assert not events.job_changed(ftj(), "DELETED")
        assert events._job_states == {}


class TestFirstSight:
    """At start-up kopf lists every job: a finished one with nothing pending, converged for its current
    spec, gets its metrics and no pass (5,000 of them took ~100 s of passes that new jobs waited behind)."""

    @staticmethod
    def finished(observed_generation: int = 1, **spec: Any) -> dict[str, Any]:
        condition = {"type": "Succeeded", "status": "True", "reason": "TrainingComplete", "message": "",
                     "lastTransitionTime": "2026-12-04T00:00:00Z"}
        return {**ftj(), "spec": spec, "status": {"observedGeneration": observed_generation, "phase": "Succeeded",
                                                  "conditions": [condition]}}

    @staticmethod
    def deliver(body: dict[str, Any], event_type: str | None = None) -> None:
        metadata = body["metadata"]
        handlers.on_job_event(namespace=metadata["namespace"], name=metadata["name"], uid=metadata["uid"],
                              spec=body.get("spec") or {}, status=body.get("status") or {}, body=body,
                              type=event_type)

    def test_a_settled_job_is_counted_without_a_pass(self, submitted: list[tuple[str, ...]]) -> None:
        self.deliver(self.finished())
        assert submitted == []
        assert ("ns", "j") in handlers.EVENTS.settled
        assert RUNTIME.metrics.jobs.labels("ns", "Succeeded")._value.get() == 1
        self.deliver({**self.finished(), "metadata": {**ftj()["metadata"], "labels": {"team": "a"}}}, "MODIFIED")
        assert submitted == [("reconcile of", "ns", "j")]  # a user's write still reconciles

    @pytest.mark.parametrize("body", [
        pytest.param(finished(observed_generation=0), id="a spec the last pass did not see"),
        pytest.param(finished(serving={"enabled": True}), id="serving"),
        pytest.param(finished(ttlSecondsAfterFinished=60), id="children to expire"),
        pytest.param({**ftj(), "spec": {}, "status": {"observedGeneration": 1, "phase": "Training"}}, id="unfinished"),
        pytest.param({**finished(), "metadata": {**ftj()["metadata"], "deletionTimestamp": "2026-12-04T00:00:00Z"}},
                     id="being deleted"),
    ])
    def test_anything_else_gets_its_pass(self, body: dict[str, Any], submitted: list[tuple[str, ...]]) -> None:
        self.deliver(body)
        assert submitted == [("reconcile of", "ns", "j")]


class TestChildEvents:
    @staticmethod
    def trainer_job(succeeded: int = 0) -> dict[str, Any]:
        return {"kind": "Job", "metadata": {
            "namespace": "ns", "name": "j-train", "uid": "c1",
            "labels": {"app.kubernetes.io/component": "trainer", "app.kubernetes.io/instance": "j"},
            "ownerReferences": [{"kind": "FineTuneJob", "apiVersion": "kubetune.io/v1alpha1", "name": "j"}]},
            "spec": {}, "status": {"succeeded": succeeded,
                                   "conditions": [{"type": "Complete", "status": "True"}] if succeeded else []}}

    def test_a_replica_kopf_has_paused_does_nothing(self, monkeypatch: pytest.MonkeyPatch,
                                                     submitted: list[tuple[str, ...]]) -> None:
        monkeypatch.setattr(RUNTIME, "leading", lambda: False)
        handlers.child_event(cache.JOB, "MODIFIED", self.trainer_job(succeeded=1))
        assert submitted == []

    def test_a_change_reconciles_the_owner_and_a_finished_trainer_admits_waiting_jobs(
            self, monkeypatch: pytest.MonkeyPatch, submitted: list[tuple[str, ...]]) -> None:
        monkeypatch.setattr(RUNTIME, "leading", lambda: True)
        handlers.child_event(cache.JOB, "ADDED", self.trainer_job())
        assert submitted == [("reconcile of", "ns", "j")]
        handlers.child_event(cache.JOB, "MODIFIED", self.trainer_job())  # nothing reconcile reads changed
        assert submitted == [("reconcile of", "ns", "j")]
        handlers.child_event(cache.JOB, "MODIFIED", self.trainer_job(succeeded=1))
        assert submitted[1:] == [("reconcile of", "ns", "j"), ("admitting waiting jobs in", "ns")]


def test_one_reaction_waits_per_key_and_a_failure_does_not_stop_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RUNTIME, "_settings", dataclasses.replace(OperatorSettings(), reconcile_threads=1))
    reactions = handlers._Reactions()
    started, gate, ran = threading.Event(), threading.Event(), []

    def slow() -> None:
        started.set()
        gate.wait(10)
        ran.append("first")

    try:
        assert reactions.submit(("k", "a"), slow)
        assert started.wait(10)  # running: its key is free again
        assert reactions.submit(("k", "a"), lambda: 1 / 0)  # waits behind it, and fails
        assert reactions.submit(("k", "b"), lambda: ran.append("second"))
        assert not reactions.submit(("k", "b"), lambda: ran.append("third"))  # one waiting per key
        gate.set()
        for _ in range(500):
            if len(ran) == 2:
                break
            time.sleep(0.01)
        assert ran == ["first", "second"]
    finally:
        gate.set()
        reactions.stop()


class TestPeeringPaused:
    """kopf pauses a replica while a live peer of higher priority is listed in the peering object; the
    operator's own reactions follow the same rule (`Runtime.leading`)."""

    class Custom:
        def __init__(self, status: dict[str, Any] | None, error: Exception | None = None) -> None:
            self.status, self.error = status, error

        def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            if self.error is not None:
                raise self.error
            items = [] if self.status is None else [{"metadata": {"name": "kubetune"}, "status": self.status}]
            return {"items": items}

    @staticmethod
    def client(custom: Any) -> KubeClient:
        kube = KubeClient(kubernetes.client.ApiClient())
        kube.custom = custom
        return kube

    @staticmethod
    def peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, Any]:
        seen = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
        return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}

    def test_no_peering_object_never_pauses(self) -> None:
        assert not self.client(self.Custom(None)).peering_paused("kubetune", (), 0)

    def test_a_live_peer_of_higher_priority_pauses(self) -> None:
        kube = self.client(self.Custom({"rival": self.peer(100, 5), "me": self.peer(10, 1)}))
        assert kube.peering_paused("kubetune", (), 10)
        assert not kube.peering_paused("kubetune", (), 100)  # equal priority: kopf only warns

    def test_a_peer_past_its_lifetime_does_not(self) -> None:
        assert not self.client(self.Custom({"rival": self.peer(100, 61)})).peering_paused("kubetune", (), 10)

    def test_in_doubt_it_pauses(self) -> None:
        forbidden = kubernetes.client.exceptions.ApiException(status=403)
        assert self.client(self.Custom({}, error=forbidden)).peering_paused("kubetune", (), 0)
        missing = kubernetes.client.exceptions.ApiException(status=404)  # no peering CRD: kopf works alone
        assert not self.client(self.Custom({}, error=missing)).peering_paused("kubetune", (), 0)
