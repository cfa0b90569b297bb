"""Bodies for the sweep unit tests: a sweep as the API server stores it, and its trials in any state."""

from __future__ import annotations

import copy
from typing import Any

from kubetune.operator.sweeps import reconcile as sweep
from kubetune.operator.sweeps.models import FineTuneSweepSpec

TEMPLATE: dict[str, Any] = {
    "model": {"source": "pvc://models/base/tiny"},
    "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
    "output": {"storage": "pvc://models/finetunes"},
    "method": {"type": "lora"},
    "serving": {"enabled": True, "replicas": 2},
}


def sweep_body(name: str = "lr", **spec: Any) -> dict[str, Any]:
    """A FineTuneSweep with a learning-rate search space unless `parameters` is given."""
    body: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": "team", "uid": "uid-sweep", "generation": 1},
        "spec": {"template": copy.deepcopy(TEMPLATE),
                 "parameters": [{"name": "hyperparameters.learningRate", "type": "categorical",
                                 "values": [1e-4, 3e-4, 1e-3, 3e-3]}],
                 "algorithm": {"type": "grid"}, "maxTrials": 4, "parallelTrials": 2},
    }
    body["spec"].update(spec)
    return body


def spec_of(body: dict[str, Any]) -> FineTuneSweepSpec:
    return FineTuneSweepSpec.from_dict(body["spec"])


def condition(type_: str, status: str = "True", reason: str = "R") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": "", "observedGeneration": 1,
            "lastTransitionTime": "2025-01-01T00:00:00Z"}


def trial(body: dict[str, Any], index: int, state: str = "Pending", *, val_loss: float | None = None,
          results: dict[str, float] | None = None, history: list[tuple[int, float]] | None = None,
          curve: list[dict[str, Any]] | None = None, serving: bool = False) -> dict[str, Any]:
    """Trial `index` of the sweep as the FineTuneJob operator would have left it in `state`."""
    child = sweep.trial_manifest(body, spec_of(body), index)
    child["metadata"]["uid"] = f"uid-t{index}"
    status: dict[str, Any] = {}
    if state == "Running":
        status["conditions"] = [condition("Running")]
    elif state == "Succeeded":
        status["conditions"] = [condition("Running", "False"), condition("Succeeded")]
    elif state == "Failed":
        status["conditions"] = [condition("Failed", reason="BackoffLimitExceeded")]
    elif state == "Stopped":
        child["spec"]["suspend"] = True
    elif state == "QuotaExceeded":
        status["conditions"] = [condition("Running", "False", "QuotaExceeded")]
    if val_loss is not None:
        status["metrics"] = {"valLoss": val_loss}
    if results is not None:
        status["results"] = results
    if history:
        status["checkpoints"] = [{"step": s, "valLoss": v, "path": f"/ckpt/{s}"} for s, v in history]
        status["progress"] = {"step": history[-1][0]}
    if curve:  # every validation, as the progress endpoint keeps them in status.metrics.evaluations
        status.setdefault("metrics", {})["evaluations"] = curve
        status["progress"] = {"step": curve[-1]["step"]}
    child["spec"]["serving"]["enabled"] = serving
    child["status"] = status
    return child
