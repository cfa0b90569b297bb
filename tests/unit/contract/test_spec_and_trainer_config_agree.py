"""A FineTuneJob spec (api/finetunejob.py) and the trainer config rendered from it (api/config.py) accept
the same values.

The operator renders the spec into the trainer config; a value one side accepts and the other
refuses is a job that passes admission and then fails in its pod (or the reverse). The trainer
had a parser of its own, and the disagreements it had are pinned here, value by value, through
the operator's render (which parses with the trainer's parser) and the spec's parser.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune.api import finetunejob as models, schema as apischema
from kubetune.operator.jobs import render

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "agree", "namespace": "team-a", "uid": "u-1"},
    "spec": {"model": {"source": "pvc://models/base/tiny"},
             "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
             "output": {"storage": "pvc://models/finetunes"}},
}


def with_value(section: str, field: str, value: Any) -> dict[str, Any]:
    job = copy.deepcopy(JOB)
    job["spec"].setdefault(section, {})[field] = value
    return job


def operator_accepts(job: dict[str, Any]) -> bool:
    try:
        models.FineTuneJobSpec.from_dict(job["spec"])
    except (apischema.ValidationError, ValueError, TypeError):
        return False
    return True


def trainer_accepts(job: dict[str, Any]) -> bool:
    try:
        render.trainer_config_for(job)  # renders and parses with the trainer's own config parser
    except render.SpecError:
        return False
    return True


@pytest.mark.parametrize("value", [1, 3, 1000, "auto", 0, 1001, 2.5, -1, True, "3"], ids=repr)
def test_epochs_are_accepted_by_both_sides_or_by_neither(value: Any) -> None:
    # The CRD says a whole number from 1 to 1000 (or auto); the trainer took any positive fraction.
    job = with_value("hyperparameters", "epochs", value)
    assert operator_accepts(job) == trainer_accepts(job), (
        f"epochs {value!r}: operator {'accepts' if operator_accepts(job) else 'refuses'}, "
        f"trainer {'accepts' if trainer_accepts(job) else 'refuses'}")
