"""The typed FineTuneJob models: parsing a spec with defaults, naming bad fields, and the status shape."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune.api import finetunejob as models, schema as apischema
from kubetune.operator.jobs import render
from kubetune.operator.progress import reports

MINIMAL: dict[str, Any] = {
    "model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"train": {"source": "pvc://data/support/train.jsonl"}},
    "output": {"storage": "pvc://models/finetunes"},
}


def spec(**sections: Any) -> dict[str, Any]:
    body = copy.deepcopy(MINIMAL)
    body.update(sections)
    return body


class TestFromDict:
    def test_minimal_spec_gets_every_default(self) -> None:
        parsed = models.FineTuneJobSpec.from_dict(MINIMAL)
        assert parsed.method == models.MethodSpec(type="lora", lora=None)
        assert parsed.method.lora_settings() == models.LoraSettings(rank=8, alpha=16, dropout=0.05)
        assert parsed.dataset.format == "text"
        assert parsed.dataset.split == models.Split(validation=0.1, test=0.1, seed=42, stratify=True)
        assert parsed.hyperparameters.epochs == "auto" and parsed.hyperparameters.learning_rate is None
        assert parsed.training.keep_checkpoints == 2 and parsed.training.early_stopping.patience == 3
        assert (parsed.suspend, parsed.backoff_limit, parsed.serving, parsed.resources) == (False, 3, None, None)

    def test_typed_values(self) -> None:
        parsed = models.FineTuneJobSpec.from_dict(spec(
            hyperparameters={"epochs": 2, "learningRate": 1, "batchSize": "auto"},
            resources={"gpus": 4, "cpu": 8, "memory": "64Gi", "tolerations": [{"key": "gpu", "operator": "Exists"}]},
        ))
        assert parsed.hyperparameters.epochs == 2
        assert parsed.hyperparameters.learning_rate == 1.0 and isinstance(parsed.hyperparameters.learning_rate, float)
        assert parsed.resources is not None and parsed.resources.gpu_count() == 4
        assert parsed.resources.tolerations == [models.Toleration(key="gpu", operator="Exists")]

    @pytest.mark.parametrize(("gpus", "count"), [(None, 0), (0, 0), ("auto", 1), (2, 2)])
    def test_gpu_count(self, gpus: Any, count: int) -> None:
        assert models.ResourcesSpec(gpus=gpus).gpu_count() == count

    def test_round_trips_through_to_dict(self) -> None:
        parsed = models.FineTuneJobSpec.from_dict(spec(method={"type": "lora", "lora": {"rank": 16}},
                                                       serving={"enabled": True}))
        assert models.FineTuneJobSpec.from_dict(parsed.to_dict()) == parsed

    @pytest.mark.parametrize(("patch", "problem"), [
        ({"model": {"fromJob": "Not_A_Name"}}, "spec.model.fromJob: "),
        ({"dataset": {"train": {"source": "pvc://d/t.jsonl"}, "format": "qa"}},
         'spec.dataset.format: must be one of "text", "prompt_completion", "chat", "classification", got "qa"'),
        ({"hyperparameters": {"epochs": 0}}, 'spec.hyperparameters.epochs: must be from 1 to 1000 or "auto", got 0'),
        ({"hyperparameters": {"learningRate": "auto"}}, 'spec.hyperparameters.learningRate: must be a number, got "auto"'),
        ({"method": {"type": "lora", "lora": {"rank": 0}}}, "spec.method.lora.rank: must be from 1 to 1024, got 0"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory: must be a Kubernetes quantity"),
        ({"suspend": "yes"}, 'spec.suspend: must be true or false, got "yes"'),
        ({"backoffLimit": 101}, "spec.backoffLimit: must be from 0 to 100, got 101"),
        ({"learningRate": 0.1}, "spec.learningRate: unknown field"),
    ])
    def test_bad_values_name_their_field(self, patch: dict[str, Any], problem: str) -> None:
        with pytest.raises(apischema.ValidationError) as caught:
            models.FineTuneJobSpec.from_dict(spec(**patch))
        assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems

    def test_not_a_mapping(self) -> None:
        with pytest.raises(apischema.ValidationError, match="spec: must be a mapping"):
            models.FineTuneJobSpec.from_dict(None)


class TestTheOperatorRendersEveryParsedSpec:
    """A defaulted spec (what the API server stores) is a valid trainer config for the operator's renderer."""

    def test_defaulted_minimal_spec_renders(self) -> None:
        defaulted = models.FineTuneJobSpec.from_dict(MINIMAL).to_dict()
        body = {"metadata": {"name": "job", "namespace": "team", "uid": "u"}, "spec": defaulted}
        rendered = render.trainer_config_for(body)
        assert rendered.config["dataset"]["split"]["validation"] == 0.1
        assert rendered.output_uri == "pvc://models/finetunes/job"


class TestStatus:
    def test_a_report_merged_by_the_operator_fits_the_status_schema(self) -> None:
        body = {"job": {"namespace": "ns", "name": "j", "uid": "u"}, "attempt": 0, "seq": 3,
                "time": "2026-01-01T00:00:00Z", "kind": "checkpoint", "step": 20, "totalSteps": 80,
                "epoch": 0.5, "trainLoss": 2.1, "valLoss": 2.3, "valPerplexity": 9.97, "learningRate": 2e-4,
                "tokensSeen": 40960, "tokensPerSecond": 1234.5, "etaSeconds": 60.0,
                "checkpoint": {"step": 20, "path": "/out/checkpoints/step-20", "valLoss": 2.3}}
        report = reports.parse_report(json.dumps(body).encode(), 64 * 1024)
        status = reports.merge_report({}, report, recent_checkpoints=5)
        parsed = models.status_from_dict(status)
        assert parsed["progress"]["percent"] == 25.0
        assert parsed["metrics"]["bestCheckpoint"]["step"] == 20

    def test_results_keep_unknown_metrics_but_check_known_ones(self) -> None:
        parsed = models.status_from_dict({"results": {"accuracy": 0.9, "calibrationError": 0.02,
                                                      "perClass": {"billing": {"f1": 0.8, "support": 12}}}})
        assert parsed["results"]["calibrationError"] == 0.02  # type: ignore[typeddict-item]
        with pytest.raises(apischema.ValidationError, match="status.results.accuracy: must be a number"):
            models.status_from_dict({"results": {"accuracy": "high"}})

    def test_the_trainers_classification_results_fit(self) -> None:
        from kubetune.trainer.evaluation import evaluate

        results = evaluate.classification_metrics(["a", "a", "b"], ["a", "b", "b"], ["a", "b"])
        parsed = models.status_from_dict({"results": {"loss": 0.5, "perplexity": 1.6, "tokenAccuracy": 0.7,
                                                      "examples": 3, **results}})
        assert parsed["results"]["confusionMatrix"]["matrix"] == [[1, 1], [0, 1]]
        assert parsed["results"]["perClass"]["b"]["support"] == 1

    def test_condition_needs_its_type(self) -> None:
        with pytest.raises(apischema.ValidationError, match=r"status.conditions\[0\].type: required"):
            models.status_from_dict({"conditions": [{"status": "True", "reason": "R", "message": "",
                                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
