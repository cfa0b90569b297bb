"""The operator is SIGKILLed at every stage of a job and restarted: the job still ends right.

The whole product runs for real (control plane, operator subprocess, local
node running the trainer and the server as processes). One FineTuneJob walks
through its stages; at each one the operator dies abruptly (SIGKILL, as when
its node is lost) and a fresh one starts:

1. after the Secret and ConfigMap, before any Job (a ResourceQuota of zero Jobs
   holds it there, so the stage is certain);
2. right after the dataset-validation Job appears, staying down until the
   validation pod has finished;
3. during training, after the trainer reported its first checkpoint;
4. right after the serving Deployment appears.

Afterwards there is exactly one validation Job, one trainer Job, one serving
Deployment; the job succeeded with one attempt, trained every step once and
is served; its `status.usage` holds each pod's own start and finish, and one
more operator restart exports the same usage counters (none counted twice). Finally the job is deleted while the operator is down, and is gone
within 60 s of the operator coming back.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

import pytest

from kubetune.dev import stack as local_stack
from kubetune.operator.platform.usage import parse_time
from tests.reliability.conftest import (Kube, Tenants, condition, is_true, tiny_manifest, trainer_process,
                                        trainer_reports, wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "crashy"


def kill_operator_when(stack: local_stack.LocalStack, seen: Any, what: str, timeout: float = 240) -> float:
    """Polls `seen` every 50 ms and SIGKILLs the operator the moment it is truthy; returns the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if seen():
                stack.stop_operator(kill=True)
                return time.monotonic()
        except Exception:  # noqa: BLE001 - a read during a restart may fail; poll again
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def usage_samples(stack: local_stack.LocalStack, namespace: str) -> dict[str, float]:
    """The operator's usage counters for `namespace` (its tenant label defaults to the namespace)."""
    text = urllib.request.urlopen(f"{stack.metrics_url}/metrics", timeout=30).read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace") != namespace or sample.labels.get("tenant") != namespace:
                continue
            if sample.name == "kubetune_tokens_processed_total":
                found["tokens"] = sample.value
            elif sample.name == "kubetune_cpu_seconds_total":
                found[f"{sample.labels['kind']}_cpu"] = sample.value
    return found


def exists(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except Exception as error:  # noqa: BLE001
        if getattr(error, "status", None) == 404:
            return False
        raise
    return True


class TestOperatorKilledAtEveryStage:
    def test_one_of_each_child_every_step_once_and_served(self, stack: local_stack.LocalStack, kube: Kube,
                                                           tenants: Tenants) -> None:
        namespace = tenants.create("fault-operator")
        kube.core.create_namespaced_resource_quota(namespace, {
            "metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
        manifest = tiny_manifest(NAME, hyperparameters={"epochs": 4}, training={"checkpointInterval": 4},
                                 resources={"cpu": "1"})
        started = time.monotonic()
        kube.create_ftj(namespace, manifest)

        # 1. Secret and ConfigMap written, the Job refused by the quota: the operator dies here.
        wait_until(lambda: exists(kube.core.read_namespaced_config_map, f"{NAME}-config", namespace), 60,
                   "the trainer ConfigMap")
        time.sleep(1)  # at least one refused Job creation
        stack.stop_operator(kill=True)
        assert kube.jobs(namespace) == []
        kube.core.delete_namespaced_resource_quota("no-jobs", namespace)
        stack.start_operator()

        # 2. The validation Job is created: the operator dies at once and stays down while it runs.
        kill_operator_when(stack, lambda: kube.jobs(namespace), "the validation Job")
        wait_until(lambda: any((j.get("status") or {}).get("succeeded") for j in kube.jobs(namespace)), 120,
                   "the validation Job to finish with the operator down")
        stack.start_operator()

        # 3. Training: the operator dies after the first checkpoint report and misses some reports.
        kill_operator_when(stack, lambda: any(r["kind"] == "checkpoint" for r in trainer_reports(stack, namespace)),
                           "the first checkpoint report")
        assert trainer_process(stack, namespace) is not None, "the operator died while the trainer was training"
        time.sleep(3)
        stack.start_operator()

        # 4. The serving Deployment appears: the operator dies before it can do more.
        kill_operator_when(stack, lambda: kube.deployments(namespace), "the serving Deployment")
        stack.start_operator()

        status = wait_until(lambda: (s := kube.status(namespace, NAME)) and is_true(s, "ServingReady") and s, 240,
                            "ServingReady")
        elapsed = time.monotonic() - started
        assert is_true(status, "Succeeded"), condition(status, "Failed")
        jobs = kube.jobs(namespace)
        components = sorted(j["metadata"]["labels"]["app.kubernetes.io/component"] for j in jobs)
        assert len(components) == 2 and len(set(components)) == 2, components
        assert len(kube.deployments(namespace)) == 1
        assert status["attempts"] == 1, "the trainer ran once: operator restarts never restart training"
        assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0

        model_dir = stack.claim_path(namespace, "models") / "finetunes" / NAME
        history = json.loads((model_dir / "metrics.json").read_text())["history"]["trainLoss"]
        steps = [int(step) for step, _ in history]
        assert steps == list(range(1, status["progress"]["totalSteps"] + 1)), "every step once, in order"
        print(f"\nFIGURE operator killed at 4 stages: job served {elapsed:.0f}s after creation")

        # Usage came from what really ran, across all those restarts: each pod's own start and finish.
        usage = kube.status(namespace, NAME)["usage"]
        pods = {p["metadata"]["name"]: p for p in kube.pods(namespace)}
        assert [a["kind"] for a in usage["attempts"]] == ["validation", "training"], usage
        for attempt in usage["attempts"]:
            terminated = pods[attempt["pod"]]["status"]["containerStatuses"][0]["state"]["terminated"]
            assert parse_time(attempt["startTime"]) == parse_time(pods[attempt["pod"]]["status"]["startTime"])
            assert parse_time(attempt["finishTime"]) == parse_time(terminated["finishedAt"])
        training = usage["attempts"][1]
        assert training["cpus"] == 1.0 and training["cpuSeconds"] > 0 and training["tokensProcessed"] > 0
        # The operator restarts once more: the counters come back from the stored status, equal, not doubled.
        before = usage_samples(stack, namespace)
        assert before["tokens"] == usage["tokensProcessed"]
        assert before["training_cpu"] == usage["training"]["cpuSeconds"]
        stack.stop_operator(kill=True)
        stack.start_operator()
        # The very first scrape: a counter that came back lower would be a reset to Prometheus, which
        # would then count the whole total again.
        after = usage_samples(stack, namespace)
        assert after.get("tokens") == before["tokens"] and after.get("training_cpu") == before["training_cpu"]
        assert after["validation_cpu"] == before["validation_cpu"] > 0

        # Deleted while the operator is down: gone within 60 s of its return (kopf's finalizer).
        stack.stop_operator(kill=True)
        kube.delete_ftj(namespace, NAME)
        time.sleep(2)
        back = time.monotonic()
        stack.start_operator()
        wait_until(lambda: kube.ftj(namespace, NAME) is None, 60, "the deleted FineTuneJob to go")
        gone = time.monotonic() - back
        wait_until(lambda: not kube.jobs(namespace) and not kube.deployments(namespace), 60,
                   "the children to be collected")
        assert stack.operator is not None and stack.operator.poll() is None
        print(f"FIGURE deleted while the operator was down: gone {gone:.1f}s after it came back")

