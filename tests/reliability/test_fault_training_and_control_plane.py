"""Faults under a running job: the trainer killed, the API server restarted, the operator's connections cut.

The operator reaches the API server through a relay the tests can break
(`FaultyLink`), and its resync timer is slow (60 s), so recovery has to come
from reconnected watches, not from polling.

- A trainer process SIGKILLed mid-training (exit 137, retryable) is replaced by
  the Job controller; the new pod (attempt 1) resumes from the latest complete
  checkpoint: every step is trained once, and the losses equal those of an
  uninterrupted run of the same config (so no batch was repeated or skipped).
- kube-apiserver restarted mid-run (etcd keeps its data): the job finishes, with
  one trainer Job and one serving Deployment.
- Every operator connection reset during a run (watches included): the running
  job still finishes, and a job created afterwards is picked up at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev import stack as local_stack
from tests.reliability.conftest import (FaultyLink, Kube, Tenants, condition, is_true, kill, tiny_manifest,
                                        trainer_process, trainer_reports, wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESYNC_SECONDS = 60


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    holder: dict[str, Any] = {}
    yield holder
    if "link" in holder:
        holder["link"].close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, link: dict[str, Any]) -> Iterator[local_stack.LocalStack]:
    """The whole product, with the operator talking to the API server through a FaultyLink."""
    workdir = tmp_path_factory.mktemp("reliability-cp")
    with local_stack.LocalStack(workdir, resync_seconds=RESYNC_SECONDS,
                                operator_env={"KUBETUNE_STATUS_WRITE_INTERVAL": "0.5"}) as running:
        relay = FaultyLink(running.plane.ports.apiserver)
        link["link"] = relay
        running.stop_operator()
        running.operator_env["KUBECONFIG"] = str(relay.kubeconfig(running.kubeconfig, workdir / "relayed.kubeconfig"))
        running.start_operator()
        yield running


def served(kube: Kube, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    return wait_until(lambda: (s := kube.status(namespace, name)) and is_true(s, "ServingReady") and s, timeout,
                      f"{namespace}/{name} to be served")


def finished_status(kube: Kube, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    return wait_until(lambda: (s := kube.status(namespace, name))
                      and (is_true(s, "Succeeded") or is_true(s, "Failed")) and s, timeout,
                      f"{namespace}/{name} to finish")


def assert_one_of_each(kube: Kube, namespace: str, *, serving: bool) -> None:
    components = sorted(j["metadata"]["labels"]["app.kubernetes.io/component"] for j in kube.jobs(namespace))
    assert len(components) == len(set(components)) == 2, components
    assert len(kube.deployments(namespace)) == (1 if serving else 0)


def history(stack: local_stack.LocalStack, namespace: str, name: str) -> list[list[float]]:
    folder = stack.claim_path(namespace, "models") / "finetunes" / name
    return list(json.loads((folder / "metrics.json").read_text())["history"]["trainLoss"])


def reference_losses(stack: local_stack.LocalStack, kube: Kube, namespace: str, name: str,
                     workdir: Path) -> list[list[float]]:
    """Trains the job's own rendered config once more, uninterrupted, on this machine."""
    config_map = kube.core.read_namespaced_config_map(f"{name}-config", namespace)
    text = config_map.data["trainer-config.json"]
    for claim in ("datasets", "base-models"):
        text = text.replace(f"/mnt/pvc/{claim}/", f"{stack.claim_path(namespace, claim)}/")
    config = json.loads(text)
    config["output"] = {"dir": str(workdir / "reference")}
    config.pop("job", None)
    path = workdir / "reference.json"
    path.write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(path)], check=True,
                   capture_output=True, timeout=600)
    return list(json.loads((workdir / "reference" / "metrics.json").read_text())["history"]["trainLoss"])


class TestTrainerKilledMidTraining:
    def test_the_retry_resumes_from_the_checkpoint_with_every_step_once(
            self, stack: local_stack.LocalStack, kube: Kube, tenants: Tenants, tmp_path: Path) -> None:
        namespace, name = tenants.create("fault-trainer"), "killed"
        kube.create_ftj(namespace, tiny_manifest(name, hyperparameters={"epochs": 5},
                                                 training={"checkpointInterval": 2}, serving={"enabled": False}))
        wait_until(lambda: any(r["kind"] == "checkpoint" and r["step"] >= 4 for r in trainer_reports(stack, namespace)),
                   240, "a checkpoint at step 4 or later")
        process = trainer_process(stack, namespace)
        assert process is not None
        kill(process)
        killed_at = time.monotonic()
        before = trainer_reports(stack, namespace)
        last_checkpoint = max(r["checkpoint"]["step"] for r in before if r["kind"] == "checkpoint")
        last_step = max(r.get("step") or 0 for r in before)

        status = finished_status(kube, namespace, name, 300)
        assert is_true(status, "Succeeded"), condition(status, "Failed")
        assert status["attempts"] == 2
        assert_one_of_each(kube, namespace, serving=False)
        reports = trainer_reports(stack, namespace)
        resumed = [r for r in reports if r.get("attempt") == 1 and r["kind"] == "started" and r.get("step")]
        assert len(resumed) == 1, "attempt 1 says once that it resumed"
        resumed_step = resumed[0]["step"]
        # The latest checkpoint: one every 2 steps, or the best one at a validation (keepBest).
        assert last_checkpoint <= resumed_step <= last_step
        assert resumed[0]["message"].endswith(f"/step-{resumed_step}"), resumed[0]["message"]
        assert "resumed from" in resumed[0]["message"]
        later = [r["step"] for r in reports if r.get("attempt") == 1 and r["kind"] == "progress"]
        assert later and min(later) > resumed_step, "the resumed run continues after its checkpoint"
        assert status["progress"]["step"] == status["progress"]["totalSteps"]

        trained = history(stack, namespace, name)
        total = status["progress"]["totalSteps"]
        assert [int(s) for s, _ in trained] == list(range(1, total + 1)), "every step once, in order"
        reference = reference_losses(stack, kube, namespace, name, tmp_path)
        assert [s for s, _ in reference] == [s for s, _ in trained]
        assert [loss for _, loss in trained] == pytest.approx([loss for _, loss in reference], rel=1e-4), \
            "the resumed run saw the same batches in the same order as an uninterrupted one"
        print(f"\nFIGURE trainer SIGKILLed at step {last_step}: resumed at step {resumed_step}, "
              f"finished {time.monotonic() - killed_at:.0f}s after the kill")


class TestApiServerRestartedMidRun:
    def test_the_job_finishes_with_one_of_each_child(self, stack: local_stack.LocalStack, kube: Kube,
                                                     tenants: Tenants) -> None:
        namespace, name = tenants.create("fault-apiserver"), "restarted"
        kube.create_ftj(namespace, tiny_manifest(name))
        wait_until(lambda: any(r["kind"] == "checkpoint" for r in trainer_reports(stack, namespace)), 240,
                   "the first checkpoint")
        started = time.monotonic()
        stack.plane.restart_apiserver()
        restart_seconds = time.monotonic() - started
        status = served(kube, namespace, name, 300)
        assert is_true(status, "Succeeded")
        assert status["attempts"] == 1
        assert_one_of_each(kube, namespace, serving=True)
        assert [int(s) for s, _ in history(stack, namespace, name)] == list(
            range(1, status["progress"]["totalSteps"] + 1))
        assert stack.operator is not None and stack.operator.poll() is None, "the operator rode it out"
        print(f"\nFIGURE kube-apiserver restart took {restart_seconds:.1f}s; job served "
              f"{time.monotonic() - started:.0f}s after it began")


class TestOperatorConnectionsCut:
    def test_watches_reconnect_the_running_job_finishes_and_a_new_one_starts(
            self, stack: local_stack.LocalStack, kube: Kube, tenants: Tenants, link: dict[str, Any]) -> None:
        relay: FaultyLink = link["link"]
        namespace = tenants.create("fault-network")
        kube.create_ftj(namespace, tiny_manifest("first", serving={"enabled": False}))
        wait_until(lambda: any(r["kind"] == "checkpoint" for r in trainer_reports(stack, namespace)), 240,
                   "the first checkpoint")
        assert relay.connections() >= 3, "the operator watches FineTuneJobs, Jobs, pods and Deployments"
        cut = relay.drop()
        assert cut >= 3
        time.sleep(1)
        relay.drop()  # and again, while it reconnects
        status = finished_status(kube, namespace, "first", 240)
        assert is_true(status, "Succeeded"), condition(status, "Failed")
        assert_one_of_each(kube, namespace, serving=False)

        relay.drop()
        created = time.monotonic()
        kube.create_ftj(namespace, tiny_manifest("second", serving={"enabled": False},
                                                 hyperparameters={"epochs": 1}))
        wait_until(lambda: kube.status(namespace, "second").get("conditions"), 30,
                   "the operator to notice a job created after the cut (its watch, not the 60 s timer)")
        noticed = time.monotonic() - created
        wait_until(lambda: len(kube.jobs(namespace)) == 3, 30, "the second job's validation Job")
        print(f"\nFIGURE connections cut 3 times ({cut} open at the first); a new job was noticed "
              f"after {noticed:.1f}s")
