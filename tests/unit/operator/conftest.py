"""Fixtures for the operator's unit tests: FineTuneJob bodies as the API server returns them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from kubetune.operator.settings import OperatorSettings

BASE_JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": "team-a", "uid": "uid-1", "generation": 1},
    "spec": {
        "model": {"source": "pvc://models/base/gpt2"},
        "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
        "output": {"storage": "pvc://models/finetunes"},
        "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
        "backoffLimit": 2,
    },
}


@pytest.fixture
def make_job() -> Callable[..., dict[str, Any]]:
    """Builds a FineTuneJob body; keyword arguments replace top-level spec fields, `status=` sets status."""

    def build(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
        job = copy.deepcopy(BASE_JOB)
        job["spec"].update(spec)
        if status is not None:
            job["status"] = status
        return job

    return build


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(trainer_image="trainer:test", progress_url="http://operator:8080/v1/reports",
                            secret_key=b"test-key")
