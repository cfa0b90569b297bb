"""A FineTuneSweep end to end on one machine: three real tiny training runs over the learning rate,
and the sweep's best trial is the one with the lowest validation loss.

Everything runs for real: the control plane, the operator process, the local
node running each trial's validation and trainer pods as processes, real
training steps on a tiny Llama-style model, and the sweep reading the trials'
reported validation losses from their status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetune.cli import main as cli
from kubetune.dev import stack as local_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMESPACE = "e2e-sweep"
LEARNING_RATES = [3.0e-4, 3.0e-3, 3.0e-2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    with local_stack.LocalStack(tmp_path_factory.mktemp("e2e-sweep"), resync_seconds=5) as running:
        yield running


def sweep_manifest(stack: local_stack.LocalStack) -> dict[str, Any]:
    """A sweep whose template is the `kubetune dev --tiny` FineTuneJob, over three learning rates."""
    job = yaml.safe_load(cli.prepare_demo_volumes(stack, tiny=True, namespace=NAMESPACE).read_text())
    template = job["spec"]
    template["hyperparameters"]["epochs"] = 2
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "lr"},
        "spec": {
            "template": template,
            "parameters": [{"name": "hyperparameters.learningRate", "type": "categorical", "values": LEARNING_RATES}],
            "algorithm": {"type": "grid"},
            "maxTrials": 3,
            "parallelTrials": 3,
            "objective": {"metric": "valLoss", "goal": "minimize"},
        },
    }


def test_a_learning_rate_sweep_picks_the_trial_with_the_lowest_validation_loss(
        stack: local_stack.LocalStack) -> None:
    stack.ensure_namespace(NAMESPACE)
    started = time.monotonic()
    stack.plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(sweep_manifest(stack)))

    def finished() -> dict[str, Any] | None:
        status = (stack.get("finetunesweep", "lr", NAMESPACE) or {}).get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = local_stack.wait_until(finished, 420, "the sweep to finish", interval=2)
    elapsed = time.monotonic() - started
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["counts"]["succeeded"] == 3

    trials = {t["name"]: t for t in status["trials"]}
    losses = {}
    for index, rate in enumerate(LEARNING_RATES):
        job = stack.get("finetunejob", f"lr-t{index}", NAMESPACE) or {}
        assert job["spec"]["hyperparameters"]["learningRate"] == rate
        job_status = job["status"]
        assert job_status["progress"]["step"] == job_status["progress"]["totalSteps"] > 0, "trained to the end"
        losses[f"lr-t{index}"] = job_status["metrics"]["valLoss"]
        assert trials[f"lr-t{index}"]["objective"] == losses[f"lr-t{index}"]
        # The whole learning curve reached the status, and the sweep's study saw every point of it.
        curve = job_status["metrics"]["evaluations"]
        steps = [p["step"] for p in curve]
        assert steps == sorted(steps) and steps[-1] == job_status["progress"]["totalSteps"] and len(steps) >= 2
        reported = [e["step"] for e in status["study"]["events"] if e["event"] == "report" and e["trial"] == index]
        assert reported == steps
    assert len(set(losses.values())) == 3, f"different learning rates give different losses: {losses}"
    lowest = min(losses, key=lambda name: losses[name])
    assert status["bestTrial"]["name"] == lowest
    assert status["bestTrial"]["objective"] == losses[lowest]
    table = stack.plane.kubectl("get", "fts", "lr", "-n", NAMESPACE).stdout
    phase, best, done, total = table.splitlines()[1].split()[1:5]
    assert (phase, float(best), done, total) == ("Succeeded", losses[lowest], "3", "3")
    print(f"\nsweep of 3 tiny trials finished in {elapsed:.0f}s; valLoss by trial: {losses}; best {lowest}")
