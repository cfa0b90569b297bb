"""Fixtures for the FineTuneSweep integration tests: both CRDs, the whole operator as a real process,
and helpers that play the kubelet and the trainer for the sweep's trials.

There is no kubelet: a trial (a real FineTuneJob handled by the real operator)
is driven as its pods would drive it: the validation pod exits 0, the trainer
pod runs, posts authenticated progress reports over HTTP (evaluations and
checkpoints with validation losses), and ends with an exit code and a
termination message (the trainer's JSON summary). The operator turns that into
the trial's status, from which the sweep reads its results.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.integration.operator.conftest import Kube, OperatorProcess, wait_for

REPO = Path(__file__).resolve().parents[3]
CRDS = [REPO / "crds" / "finetunejobs.kubetune.io.yaml", REPO / "crds" / "finetunesweeps.kubetune.io.yaml"]
NAMESPACE_PREFIX = "kubetune-sweeptest-"
GROUP, VERSION = "kubetune.io", "v1alpha1"


@pytest.fixture(scope="module")
def kube(cluster: Any) -> Kube:
    return Kube(cluster.api_client())


@pytest.fixture(scope="module")
def crds(cluster: Any) -> None:
    for path in CRDS:
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for name in ("finetunejobs.kubetune.io", "finetunesweeps.kubetune.io"):
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


@pytest.fixture(scope="module")
def operator(cluster: Any, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("sweep-operator"))
    process.env["KUBETUNE_NAMESPACES"] = f"{NAMESPACE_PREFIX}*"
    process.start()
    yield process
    process.stop()


@pytest.fixture
def namespace(cluster: Any, kube: Kube) -> Iterator[str]:
    name = f"{NAMESPACE_PREFIX}{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name}})
    yield name
    kube.core.delete_namespace(name)


def sweep_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneSweep over the learning rate (4 values, grid) unless told otherwise."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneSweep", "metadata": {"name": name},
        "spec": {
            "template": {
                "model": {"source": "pvc://models/base/tiny-gpt2"},
                "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
                "output": {"storage": "pvc://models/finetunes"},
                "backoffLimit": 0,
            },
            "parameters": [{"name": "hyperparameters.learningRate", "type": "categorical",
                            "values": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}],
            "algorithm": {"type": "grid"},
            "maxTrials": 4,
            "parallelTrials": 2,
        },
    }
    body["spec"].update(spec)
    return body


class Sweeps:
    """Sweep-level reads and trial driving, over the test's Kube and operator."""

    def __init__(self, kube: Kube, operator: OperatorProcess, namespace: str) -> None:
        self.kube, self.operator, self.namespace = kube, operator, namespace

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunesweeps", body)
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunesweeps", name)
        return result

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition_is(self, name: str, type_: str, status: str, reason: str | None = None) -> bool:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == type_:
                return bool(condition["status"] == status and (reason is None or condition["reason"] == reason))
        return False

    def trials(self, sweep: str) -> list[dict[str, Any]]:
        """The sweep's FineTuneJobs, by trial index."""
        items = self.kube.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunejobs", label_selector=f"kubetune.io/sweep={sweep}")["items"]
        return sorted(items, key=lambda t: int(t["metadata"]["labels"]["kubetune.io/trial"]))

    def unfinished(self, sweep: str) -> list[str]:
        """Trials neither succeeded, failed nor suspended."""
        result = []
        for item in self.trials(sweep):
            found = {c["type"]: c["status"] for c in (item.get("status") or {}).get("conditions") or []}
            if found.get("Succeeded") != "True" and found.get("Failed") != "True" and not item["spec"].get("suspend"):
                result.append(item["metadata"]["name"])
        return result

    def wait_trial(self, name: str) -> dict[str, Any]:
        return dict(wait_for(lambda: self.kube.ftj(self.namespace, name), f"trial {name}"))

    def start(self, name: str) -> None:
        """Validation passes; the trainer pod runs."""
        self.wait_trial(name)
        wait_for(lambda: self.kube.job(self.namespace, f"{name}-validate"), f"the validation Job of {name}")
        self.kube.run_pod_to_end(self.namespace, f"{name}-validate", 0, json.dumps({"outcome": "validated"}))
        wait_for(lambda: self.kube.job(self.namespace, f"{name}-train"), f"the trainer Job of {name}")
        pod = wait_for(lambda: self.kube.live_pod(self.namespace, f"{name}-train"), f"the trainer pod of {name}")
        self.kube.set_pod_running(self.namespace, pod)
        wait_for(lambda: self.kube.condition_is(self.namespace, name, "Running", "True"), f"{name} Running")

    def report(self, name: str, seq: int, kind: str, **fields: Any) -> None:
        """A trainer progress report, authenticated with the trial's token, over real HTTP."""
        job = self.kube.ftj(self.namespace, name)
        secret = self.kube.core.read_namespaced_secret(f"{name}-progress", self.namespace)
        token = base64.b64decode(secret.data["token"]).decode()
        body = {"job": {"namespace": self.namespace, "name": name, "uid": job["metadata"]["uid"]}, "attempt": 0,
                "seq": seq, "kind": kind, "time": datetime.now(timezone.utc).isoformat(), **fields}
        status, answer = self.operator.post_report(body, token)
        assert status == 202, answer

    def evaluate(self, name: str, history: list[tuple[int, float]], total_steps: int = 30) -> None:
        """Evaluation + checkpoint reports at each (step, validation loss)."""
        for seq, (step, loss) in enumerate(history, start=1):
            self.report(name, seq, "checkpoint", step=step, totalSteps=total_steps, valLoss=loss,
                        checkpoint={"step": step, "path": f"/out/checkpoints/step-{step}", "valLoss": loss})
        last_step, last_loss = history[-1]
        wait_for(lambda: any(c.get("step") == last_step for c in
                             (self.kube.ftj(self.namespace, name).get("status") or {}).get("checkpoints") or []),
                 f"{name}'s checkpoint at step {last_step} in status")

    def validate(self, name: str, curve: list[tuple[int, float]], *, first_seq: int = 1, total_steps: int = 30) -> int:
        """`evaluation` reports (as the trainer sends at every validation) at each (step, validation loss);
        waits until the last one is in the trial's `status.metrics.evaluations`. Returns the next seq."""
        seq = first_seq
        for step, loss in curve:
            self.report(name, seq, "evaluation", step=step, totalSteps=total_steps, valLoss=loss,
                        valPerplexity=2.718 ** loss, results={"valTokenAccuracy": 0.5})
            seq += 1
        last_step = curve[-1][0]
        wait_for(lambda: any(p.get("step") == last_step for p in ((self.kube.ftj(self.namespace, name).get("status")
                                                                     or {}).get("metrics") or {}).get("evaluations") or []),
                 f"{name}'s validation at step {last_step} in status")
        return seq

    def reconciles(self, sweep: str) -> float:
        from tests.integration.operator.test_operator_lifecycle import metric

        return metric(self.operator.metrics(), "kubetune_sweep_reconciles_total", namespace=self.namespace,
                      sweep=sweep) or 0.0

    def wait_reconciled(self, sweep: str) -> None:
        """Wait until the operator has run a whole reconcile of the sweep that started after this call
        (the positive signal to wait for before asserting that nothing happened)."""
        start = self.reconciles(sweep)
        wait_for(lambda: self.reconciles(sweep) >= start + 2, f"two more reconciles of sweep {sweep}", timeout=60)

    def study_has(self, sweep: str, **event: Any) -> bool:
        events = (self.status(sweep).get("study") or {}).get("events") or []
        return any(all(e.get(k) == v for k, v in event.items()) for e in events)

    def finish(self, name: str, *, exit_code: int = 0, val_loss: float | None = None,
               results: dict[str, float] | None = None) -> None:
        """The trainer pod ends; its termination message is the trainer's summary."""
        summary: dict[str, Any] = {"outcome": "succeeded" if exit_code == 0 else "failed", "step": 30}
        if val_loss is not None:
            summary["valLoss"] = val_loss
        if results is not None:
            summary["results"] = results
        if exit_code:
            summary["message"] = "bad data: a record has no text field"
        pod = wait_for(lambda: self.kube.live_pod(self.namespace, f"{name}-train"), f"the trainer pod of {name}")
        self.kube.set_pod_finished(self.namespace, pod, exit_code, json.dumps(summary))
        outcome = "Succeeded" if exit_code == 0 else "Failed"
        wait_for(lambda: self.kube.condition_is(self.namespace, name, outcome, "True"), f"{name} {outcome}")

    def run(self, name: str, *, val_loss: float | None = None, results: dict[str, float] | None = None,
            exit_code: int = 0) -> None:
        self.start(name)
        self.finish(name, exit_code=exit_code, val_loss=val_loss, results=results)


@pytest.fixture
def sweeps(kube: Kube, operator: OperatorProcess, namespace: str) -> Sweeps:
    return Sweeps(kube, operator, namespace)
