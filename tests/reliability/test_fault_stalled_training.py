"""A trainer that stops making progress is detected, reported and restarted from its checkpoint.

The whole product runs for real (control plane, operator subprocess, local node running the
trainer as a process) under a platform policy with `restartStalledTraining: true`. A FineTuneJob
with `training.stallTimeoutSeconds` trains until its first checkpoint; then its trainer process
is frozen (SIGSTOP: it holds its pod but reports nothing, as a trainer hung in a collective or on a
dead filesystem does). The operator must mark the job `Stalled` with a Warning Event, delete the
pod, and the replacement must resume from the checkpoint and finish the job.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import yaml

from kubetune.dev import stack as local_stack
from tests.reliability.conftest import (Kube, Tenants, condition, is_true, tiny_manifest, trainer_process,
                                        trainer_reports, wait_until)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "hangs"
STALL_SECONDS = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    workdir = tmp_path_factory.mktemp("stall")
    policy = workdir / "policy.yaml"
    policy.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "PlatformPolicy",
                                      "defaults": {"restartStalledTraining": True}}))
    with local_stack.LocalStack(workdir, resync_seconds=3, operator_env={
            "KUBETUNE_STATUS_WRITE_INTERVAL": "0.5", "KUBETUNE_POLICY_FILE": str(policy)}) as running:
        yield running


@pytest.fixture(scope="module")
def kube(stack: local_stack.LocalStack) -> Kube:
    return Kube(stack.plane.api_client())


@pytest.fixture(scope="module")
def tenants(stack: local_stack.LocalStack, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Tenants:
    return Tenants(stack, kube, tmp_path_factory.mktemp("models"))


def test_a_frozen_trainer_is_marked_stalled_and_restarted_from_its_checkpoint(
        stack: local_stack.LocalStack, kube: Kube, tenants: Tenants) -> None:
    namespace = tenants.create("stall")
    kube.create_ftj(namespace, tiny_manifest(NAME, hyperparameters={"epochs": 4},
                                             training={"checkpointInterval": 4, "stallTimeoutSeconds": STALL_SECONDS}))
    wait_until(lambda: any(r["kind"] == "checkpoint" for r in trainer_reports(stack, namespace)), 300,
               "the first checkpoint report")
    process = wait_until(lambda: trainer_process(stack, namespace), 30, "the trainer process")
    os.kill(process.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    status = wait_until(lambda: (s := kube.status(namespace, NAME)) and is_true(s, "Stalled") and s,
                        STALL_SECONDS + 60, "the Stalled condition")
    detected = time.monotonic() - frozen
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "RestartedFromCheckpoint", stalled
    assert f"stallTimeoutSeconds ({STALL_SECONDS}s)" in stalled["message"]
    # Events are posted in the background, a moment after the status.
    warnings = wait_until(lambda: [e for e in kube.events(namespace) if e.get("reason") == "RestartedFromCheckpoint"],
                          30, "the RestartedFromCheckpoint Event")
    assert warnings[0]["type"] == "Warning"

    status = wait_until(lambda: (s := kube.status(namespace, NAME)) and (is_true(s, "Succeeded") or
                                                                         is_true(s, "Failed")) and s,
                        400, "the job to finish after the restart")
    assert is_true(status, "Succeeded"), condition(status, "Failed")
    assert status["attempts"] == 2, "the stalled pod was replaced once"
    assert condition(status, "Stalled")["status"] == "False"
    resumed = [r for r in trainer_reports(stack, namespace) if r["kind"] == "started" and
               "resumed from" in str(r.get("message", ""))]
    assert resumed, "the replacement resumed from the checkpoint"
    assert [a["kind"] for a in status["usage"]["attempts"]] == ["validation", "training", "training"]
    print(f"\nFIGURE frozen trainer marked Stalled {detected:.0f}s after SIGSTOP "
          f"(stallTimeoutSeconds {STALL_SECONDS}, resync 3 s)")
