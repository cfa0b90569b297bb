"""status.usage: what really ran, from the pods' own times and resources, kept across passes and restarts."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetune.api.finetunejob import status_from_dict
from kubetune.operator.metrics import OperatorMetrics
from kubetune.operator.platform import usage

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return usage.rfc3339(at(seconds))


def pod(name: str, start: float, finish: float | None = None, *, gpus: str | None = None, cpu: str = "2",
        tokens: int | None = None, container: str = "trainer") -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": cpu}}
    if gpus is not None:
        resources = {"requests": {"cpu": cpu, "nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}
    if finish is None:
        state: dict[str, Any] = {"running": {"startedAt": stamp(start)}}
    else:
        message = json.dumps({"outcome": "succeeded", "tokensProcessed": tokens}) if tokens is not None else ""
        state = {"terminated": {"exitCode": 0, "startedAt": stamp(start), "finishedAt": stamp(finish),
                                "message": message}}
    return {"metadata": {"name": name},
            "spec": {"containers": [{"name": container, "resources": resources}]},
            "status": {"startTime": stamp(start), "containerStatuses": [{"name": container, "state": state}]}}


def deployment(ready: int, gpus: str | None = "1", cpu: str = "500m") -> dict[str, Any]:
    limits = {"nvidia.com/gpu": gpus} if gpus else {}
    return {"spec": {"replicas": ready, "template": {"spec": {"containers": [
        {"name": "server", "resources": {"requests": {"cpu": cpu}, "limits": limits}}]}}},
        "status": {"readyReplicas": ready}}


class TestDevicesComeFromThePodNotTheSpec:
    def test_gpus_and_cpus_of_the_pods_containers(self) -> None:
        assert usage.pod_devices(pod("p", 0, gpus="2", cpu="1500m")) == (2, 1.5)

    def test_a_cpu_pod_counts_no_accelerator_whatever_the_spec_said(self) -> None:
        # `gpus: auto` on a CPU-only platform renders no GPU resource: nothing to charge.
        assert usage.pod_devices(pod("p", 0, cpu="4")) == (0, 4.0)

    def test_other_vendors_accelerators_count(self) -> None:
        body = pod("p", 0)
        body["spec"]["containers"][0]["resources"]["limits"] = {"amd.com/gpu": "1", "google.com/tpu": "4"}
        assert usage.pod_devices(body)[0] == 5

    def test_serving_devices_per_replica_from_the_template(self) -> None:
        assert usage.template_devices(deployment(3, gpus="1", cpu="250m")) == (1, 0.25)


class TestAttempts:
    def test_a_finished_pod_is_charged_from_start_to_finish(self) -> None:
        result = usage.update(None, now=at(1000), training_pods=(pod("t-0", 10, 70, gpus="2", tokens=4096),))
        entry = result["attempts"][0]
        assert entry["startTime"] == stamp(10) and entry["finishTime"] == stamp(70)
        assert entry["acceleratorSeconds"] == 120.0 and entry["cpuSeconds"] == 120.0
        assert result["training"] == {"acceleratorSeconds": 120.0, "cpuSeconds": 120.0}
        assert result["tokensProcessed"] == 4096 and result["trainingAttempts"] == 1
        assert result["lastUpdated"] == stamp(1000)

    def test_a_running_pod_is_charged_up_to_now_and_the_next_pass_continues(self) -> None:
        first = usage.update(None, now=at(100), training_pods=(pod("t-0", 40, gpus="1"),))
        assert first["training"]["acceleratorSeconds"] == 60.0
        assert "finishTime" not in first["attempts"][0]
        later = usage.update(first, now=at(400), training_pods=(pod("t-0", 40, 300, gpus="1", tokens=10),))
        assert later["training"]["acceleratorSeconds"] == 260.0

    def test_retries_validation_and_training_are_kept_apart(self) -> None:
        validation = usage.update(None, now=at(30), validation_pods=(pod("v-0", 0, 20, cpu="1", container="validate"),),
                                  validation_container="validate")
        # Once the trainer Job exists the validation pods are no longer read: their entry stays.
        result = usage.update(validation, now=at(500), training_pods=(
            pod("t-0", 30, 130, gpus="1", tokens=100), pod("t-1", 140, 240, gpus="1", tokens=200)))
        assert [e["kind"] for e in result["attempts"]] == ["validation", "training", "training"]
        assert result["validation"] == {"acceleratorSeconds": 0.0, "cpuSeconds": 20.0}
        assert result["training"]["acceleratorSeconds"] == 200.0
        assert result["tokensProcessed"] == 300 and result["trainingAttempts"] == 2

    def test_a_pod_that_vanished_while_running_is_closed_at_the_last_time_it_was_seen(self) -> None:
        running = usage.update(None, now=at(100), training_pods=(pod("t-0", 0, gpus="1"),))
        gone = usage.update(running, now=at(5000), training_pods=())
        assert gone["attempts"][0]["finishTime"] == stamp(100)
        assert gone["training"]["acceleratorSeconds"] == 100.0

    def test_a_pending_pod_is_not_charged(self) -> None:
        pending = {"metadata": {"name": "t-0"}, "spec": {"containers": []}, "status": {"phase": "Pending"}}
        assert usage.update(None, now=at(10), training_pods=(pending,))["attempts"] == []

    def test_tokens_come_only_from_the_termination_message(self) -> None:
        body = pod("t-0", 0, 10, gpus="1")
        body["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "not json"
        assert usage.update(None, now=at(20), training_pods=(body,))["tokensProcessed"] == 0

    def test_old_entries_fold_into_totals_that_still_count(self) -> None:
        pods = tuple(pod(f"t-{i}", i * 10, i * 10 + 5, gpus="1", tokens=1) for i in range(usage.MAX_ATTEMPTS + 5))
        result = usage.update(None, now=at(10_000), training_pods=pods)
        assert len(result["attempts"]) == usage.MAX_ATTEMPTS
        assert result["training"]["acceleratorSeconds"] == 5.0 * (usage.MAX_ATTEMPTS + 5)
        assert result["tokensProcessed"] == usage.MAX_ATTEMPTS + 5
        assert result["trainingAttempts"] == usage.MAX_ATTEMPTS + 5


class TestServingSlices:
    def test_ready_replicas_accrue_in_slices_that_survive_a_restart(self) -> None:
        one = usage.update(None, now=at(0), serving=deployment(1))
        assert one["servingSlices"] == [{"start": stamp(0), "replicas": 1, "acceleratorsPerReplica": 1,
                                         "cpusPerReplica": 0.5}]
        # The operator restarts: the next pass reads the stored slice and continues it.
        stored = json.loads(json.dumps(one))
        two = usage.update(stored, now=at(100), serving=deployment(2))
        assert two["servingSlices"][0]["end"] == stamp(100)
        assert two["servingSlices"][1]["start"] == stamp(100) and two["servingSlices"][1]["replicas"] == 2
        three = usage.update(two, now=at(160), serving=None)
        assert three["serving"] == {"acceleratorSeconds": 100.0 + 2 * 60.0, "cpuSeconds": 0.5 * 100 + 2 * 0.5 * 60}
        assert all(s.get("end") for s in three["servingSlices"])

    def test_no_ready_replica_accrues_nothing(self) -> None:
        result = usage.update(None, now=at(100), serving=deployment(0))
        assert "servingSlices" not in result and result["serving"]["acceleratorSeconds"] == 0.0


class TestWrites:
    def test_the_running_clock_alone_is_written_at_most_once_a_minute(self) -> None:
        first = usage.update(None, now=at(0), training_pods=(pod("t-0", 0, gpus="1"),))
        assert usage.update(first, now=at(30), training_pods=(pod("t-0", 0, gpus="1"),)) is first
        assert usage.update(first, now=at(61), training_pods=(pod("t-0", 0, gpus="1"),))["lastUpdated"] == stamp(61)

    def test_a_pod_ending_is_written_at_once(self) -> None:
        first = usage.update(None, now=at(0), training_pods=(pod("t-0", 0, gpus="1"),))
        assert usage.update(first, now=at(5), training_pods=(pod("t-0", 0, 5, gpus="1"),)) is not first

    def test_accrued_adds_the_open_intervals_up_to_now(self) -> None:
        stored = usage.update(None, now=at(100), training_pods=(pod("t-0", 0, gpus="2"),), serving=deployment(1))
        assert usage.accrued(stored, usage.TRAINING, at(130)) == (260.0, 260.0)
        assert usage.accrued(stored, usage.SERVING, at(130))[0] == 30.0

    def test_the_result_passes_the_status_schema(self) -> None:
        result = usage.update(None, now=at(500), training_pods=(pod("t-0", 0, 100, gpus="1", tokens=7),),
                              validation_pods=(pod("v-0", 0, 5, container="validate"),), serving=deployment(1))
        status_from_dict({"usage": result})


class TestCountersFollowTheStoredUsage:
    def test_a_restarted_operator_exports_the_same_totals_without_double_counting(self) -> None:
        stored = usage.update(None, now=at(1000), training_pods=(pod("t-0", 0, 100, gpus="1", tokens=5000),))
        before = OperatorMetrics()
        for _ in range(3):  # every reconcile pass observes the job again
            before.observe_usage("a", "j1", "team-a", stored)
        after = OperatorMetrics()  # a fresh process seeing the same stored status
        after.observe_usage("a", "j1", "team-a", stored)
        for metrics in (before, after):
            registry = metrics.registry
            assert registry.get_sample_value("kubetune_tokens_processed_total",
                                             {"namespace": "a", "tenant": "team-a"}) == 5000
            assert registry.get_sample_value("kubetune_accelerator_seconds_total",
                                             {"namespace": "a", "tenant": "team-a", "kind": "training"}) == 100.0

    def test_counters_never_go_down_and_deleted_jobs_stay_counted(self) -> None:
        metrics = OperatorMetrics()
        metrics.observe_usage("a", "j1", "a", {"training": {"acceleratorSeconds": 50.0}, "tokensProcessed": 9})
        metrics.observe_usage("a", "j1", "a", {"training": {"acceleratorSeconds": 48.0}, "tokensProcessed": 9})
        metrics.observe_usage("a", "j2", "a", {"training": {"acceleratorSeconds": 10.0}})
        metrics.forget_job("a", "j1")
        labels = {"namespace": "a", "tenant": "a", "kind": "training"}
        assert metrics.registry.get_sample_value("kubetune_accelerator_seconds_total", labels) == 60.0
