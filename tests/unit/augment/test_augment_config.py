"""The augmentation settings: defaults off, bad values named by field, the same section in the spec and the trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import finetunejob as models, schema as apischema
from kubetune.api.config import ConfigError, config_from_dict
from kubetune.api.finetunejob import AUGMENTATION_OPERATIONS
from kubetune.operator import crd
from kubetune.trainer import __main__ as program

from .augment_datasets import sentiment_records, write_jsonl


def trainer_config(data_format: str = "classification", **augmentation: Any) -> Any:
    return config_from_dict({"model": {"source": "/m"}, "output": {"dir": "/o"},
                             "dataset": {"format": data_format, "train": {"source": "/t.jsonl"},
                                         "augmentation": augmentation}})


def problems(data_format: str = "classification", **augmentation: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        trainer_config(data_format, **augmentation)
    return caught.value.problems


class TestTrainerConfig:
    def test_off_by_default_with_every_operation_listed(self) -> None:
        settings = config_from_dict({"model": {"source": "/m"}, "output": {"dir": "/o"},
                                     "dataset": {"train": {"source": "/t"}}}).dataset.augmentation
        assert (settings.enabled, settings.synthetic.enabled) == (False, False)
        assert settings.operations == list(AUGMENTATION_OPERATIONS) and (settings.rate, settings.multiplier) == (0.1, 1)

    @pytest.mark.parametrize(("augmentation", "problem"), [
        ({"rate": 0}, "dataset.augmentation.rate: must be > 0 and <= 0.5, got 0"),
        ({"rate": 0.7}, "dataset.augmentation.rate: must be > 0 and <= 0.5, got 0.7"),
        ({"multiplier": 11}, "dataset.augmentation.multiplier: must be from 1 to 10, got 11"),
        ({"operations": []}, "dataset.augmentation.operations: must have at least 1 items, got 0"),
        ({"operations": ["shout"]}, 'dataset.augmentation.operations[0]: must be one of "wordDeletion"'),
        ({"synthetic": {"enabled": True}}, "dataset.augmentation.synthetic.promptTemplate: synthetic augmentation needs a promptTemplate"),
        ({"synthetic": {"promptTemplate": "{txt}"}},
         "dataset.augmentation.synthetic.promptTemplate: unknown placeholder {txt}; allowed: {text}, {prompt}, {label}"),
        ({"synthetic": {"minChars": 10, "maxChars": 5}}, "dataset.augmentation.synthetic.maxChars: maxChars must be 0 (no limit) or at least minChars"),
        ({"synthetic": {"temperature": -1}}, "dataset.augmentation.synthetic.temperature: must be from 0 to 5"),
    ])
    def test_bad_values_name_their_field(self, augmentation: dict[str, Any], problem: str) -> None:
        assert any(p.startswith(problem) for p in problems(**augmentation)), problems(**augmentation)

    @pytest.mark.parametrize("data_format", ["prompt_completion", "chat"])
    def test_edits_only_for_text_and_classification(self, data_format: str) -> None:
        assert any(p.startswith("dataset.augmentation.enabled: augmentation edits apply only to formats text and "
                                "classification") for p in problems(data_format, enabled=True))
        trainer_config(data_format, synthetic={"enabled": True, "promptTemplate": "Rephrase: {prompt}"})

    def test_the_label_placeholder_needs_classification(self) -> None:
        assert any("the {label} placeholder needs format classification" in p
                   for p in problems("text", synthetic={"promptTemplate": "{label}"}))


class TestTheSpec:
    def test_the_spec_section_parses_with_the_trainers_defaults(self) -> None:
        spec = models.FineTuneJobSpec.from_dict({
            "model": {"source": "hf://a/b"}, "output": {"storage": "pvc://m/x"},
            "dataset": {"train": {"source": "pvc://d/t.jsonl"}, "augmentation": {"enabled": True}}})
        settings = spec.dataset.augmentation
        assert settings.enabled and settings.multiplier == 1 and settings.synthetic == models.SyntheticAugmentation()
        assert settings.operations == list(AUGMENTATION_OPERATIONS)

    def test_out_of_range_values_are_named(self) -> None:
        with pytest.raises(apischema.ValidationError) as caught:
            models.FineTuneJobSpec.from_dict({
                "model": {"source": "hf://a/b"}, "output": {"storage": "pvc://m/x"},
                "dataset": {"train": {"source": "pvc://d/t.jsonl"}, "augmentation": {"multiplier": 0}}})
        assert any(p.startswith("spec.dataset.augmentation.multiplier: must be from 1 to 10")
                   for p in caught.value.problems)

    def test_the_crd_carries_the_cel_rules_at_their_fields(self) -> None:
        schema = json.dumps(crd.crd_manifest(crd.FINETUNEJOB))
        assert "augmentation edits apply only to formats text and classification" in schema
        assert "synthetic augmentation needs a promptTemplate" in schema
        assert "the {label} placeholder needs format classification" in schema


@pytest.mark.slow
class TestAWholeRun:
    def test_metrics_json_records_the_augmentation(self, tmp_path: Path, tiny_generator: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records(40))
        out = tmp_path / "out"
        config = {
            "model": {"source": str(tiny_generator)}, "output": {"dir": str(out)}, "method": {"type": "full"},
            "dataset": {"format": "classification", "train": {"source": str(train)},
                        "augmentation": {"enabled": True, "multiplier": 2, "operations": ["wordSwap", "charNoise"],
                                         "synthetic": {"enabled": True, "promptTemplate": "A {label} one: {text}",
                                                       "count": 4, "maxNewTokens": 8, "minChars": 1}}},
            "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 1e-3, "gradientAccumulationSteps": 1},
        }
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        assert program.main(["--config", str(path)]) == 0
        data = json.loads((out / "metrics.json").read_text())["data"]
        augmentation = data["augmentation"]
        real = augmentation["realExamples"]
        assert (augmentation["operations"], augmentation["rate"], augmentation["multiplier"]) == (
            ["wordSwap", "charNoise"], 0.1, 2)
        assert augmentation["added"] == 2 * real
        synthetic = augmentation["synthetic"]
        assert synthetic["generated"] == 4 and synthetic["kept"] == 4 - synthetic["droppedTooShort"] - \
            synthetic["droppedTooLong"] - synthetic["droppedDuplicate"]
        assert data["splits"]["train"] == 3 * real + synthetic["kept"]
