"""The sweep example in examples/ parses into the typed model and yields valid, distinct trials."""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.api import finetunejob as models
from kubetune.operator.sweeps import reconcile as sweep
from kubetune.operator.sweeps.models import FineTuneSweepSpec

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sweep-learning-rate.yaml"


def test_the_example_is_a_commented_sweep_that_round_trips_through_the_model() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    body = yaml.safe_load(text)
    assert text.startswith("#") and (body["apiVersion"], body["kind"]) == ("kubetune.io/v1alpha1", "FineTuneSweep")
    spec = FineTuneSweepSpec.from_dict(body["spec"])
    assert FineTuneSweepSpec.from_dict(spec.to_dict()) == spec


def test_the_examples_trials_are_valid_finetunejobs_with_distinct_values() -> None:
    body = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    body["metadata"].update(namespace="team", uid="uid-1")
    spec = FineTuneSweepSpec.from_dict(body["spec"])
    sweep.check_spec(spec)
    trials = [sweep.trial_manifest(body, spec, i) for i in range(sweep.trial_count(spec))]
    assert len(trials) == 8
    values = {(t["spec"]["hyperparameters"]["learningRate"], t["spec"]["method"]["lora"]["rank"]) for t in trials}
    assert len(values) == 8
    for trial in trials:
        parsed = models.FineTuneJobSpec.from_dict(trial["spec"])
        assert 5e-5 <= (parsed.hyperparameters.learning_rate or 0) <= 1e-3
        assert parsed.method.lora_settings().rank in (8, 16, 24, 32)
        assert parsed.serving is not None and parsed.serving.enabled is False
