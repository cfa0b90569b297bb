"""The trainer config (`kubetune.api.config`): the spec's own sections and defaults, camelCase keys, one error
listing every problem, the rules across fields the API server enforces, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api import config as cfg, process as api_process
from kubetune.trainer import config_file

MINIMAL = {"model": {"source": "/models/base"}, "dataset": {"train": {"source": "/data/train.jsonl"}}, "output": {"dir": "/out"}}


def _with(**sections: dict) -> dict:
    data = json.loads(json.dumps(MINIMAL))
    for name, section in sections.items():
        data.setdefault(name, {}).update(section)
    return data


def _problems(data: dict) -> list[str]:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.config_from_dict(data)
    return caught.value.problems


class TestDefaults:
    def test_a_minimal_config_gets_documented_defaults(self) -> None:
        config = cfg.config_from_dict(MINIMAL)

        assert config.dataset.format == "text"
        assert config.method.type == "lora"
        assert config.method.lora is None and config.method.lora_settings().rank == 8
        assert config.hyperparameters.learning_rate is None  # automatic, as in the spec
        assert config.hyperparameters.batch_size == "auto"
        assert config.dataset.split.validation == 0.1
        assert config.training.keep_checkpoints == 2
        assert config.output.checkpoint_path == Path("/out/checkpoints")

    def test_camel_case_keys_round_trip(self) -> None:
        data = _with(hyperparameters={"maxSeqLength": 128, "gradientAccumulationSteps": 2, "learningRate": 1e-3})
        config = cfg.config_from_dict(data)

        assert config.hyperparameters.max_seq_length == 128
        assert cfg.config_to_dict(config)["hyperparameters"]["gradientAccumulationSteps"] == 2
        assert cfg.config_from_dict(cfg.config_to_dict(config)) == config

    def test_yaml_and_json_files_load(self, tmp_path: Path) -> None:
        (tmp_path / "c.json").write_text(json.dumps(MINIMAL))
        (tmp_path / "c.yaml").write_text("model: {source: /models/base}\ndataset:\n  train: {source: /d.csv}\noutput: {dir: /o}\n")

        assert config_file.load_config(tmp_path / "c.json").model.source == "/models/base"
        assert config_file.load_config(tmp_path / "c.yaml").dataset.train.source == "/d.csv"


class TestValidation:
    def test_every_problem_is_listed_by_field_path(self) -> None:
        data = _with(
            dataset={"format": "qa", "split": {"validation": 1.5}},
            hyperparameters={"learningRate": -1, "batchSize": "big"},
            method={"lora": {"rank": 0}},
        )
        del data["output"]

        problems = _problems(data)

        assert "dataset.format: must be one of \"text\", \"prompt_completion\", \"chat\", \"classification\", got \"qa\"" in problems
        assert "dataset.split.validation: must be >= 0 and < 1, got 1.5" in problems
        assert "hyperparameters.learningRate: must be > 0 and <= 1, got -1.0" in problems
        assert 'hyperparameters.batchSize: must be an integer or "auto", got "big"' in problems
        assert "method.lora.rank: must be from 1 to 1024, got 0" in problems
        assert "output: required" in problems
        assert len(problems) == 6

    def test_unknown_keys_are_named_with_the_allowed_ones(self) -> None:
        problems = _problems(_with(training={"earlyStoping": {"enabled": True}}))

        assert problems[0].startswith("training.earlyStoping: unknown field; allowed: checkpointInterval, ")
        assert ", earlyStopping, " in problems[0]

    def test_booleans_are_not_numbers_and_numbers_are_not_booleans(self) -> None:
        problems = _problems(_with(hyperparameters={"seed": True}, training={"packing": 1}))

        assert 'hyperparameters.seed: must be an integer or "auto", got true' in problems
        assert "training.packing: must be true or false, got 1" in problems

    def test_cross_field_rules_are_the_api_servers(self) -> None:
        """The same rules as the FineTuneJob's CEL, applied by their Python twins, with the same messages."""
        problems = _problems(_with(dataset={"labels": ["a", "b"], "imbalance": {"strategy": "oversample"}}))
        assert problems == ["dataset.labels: labels apply only to format classification",
                            "dataset.imbalance.strategy: imbalance.strategy applies only to format classification; "
                            "use 'none'"]

        problems = _problems(_with(dataset={"format": "classification", "split": {"validation": 0.5, "test": 0.5}}))
        assert problems == ["dataset.split: split.validation + split.test must be below 1 so that a training split "
                            "remains (fractions given by a separate validation/test source do not count)"]

        problems = _problems(_with(training={"earlyStopping": {"enabled": True, "metric": "valF1"}}))
        assert problems == ["training.earlyStopping.metric: valAccuracy needs dataset.format classification "
                            "(valF1 too); use valLoss or valPerplexity"]

    def test_the_model_source_is_resolved_and_a_location_the_spec_allows(self) -> None:
        problems = _problems(_with(model={"source": None, "fromJob": "earlier"}))
        assert problems == ["model.source: required: where the base model is (the operator resolves "
                            "spec.model.fromJob into it)"]
        problems = _problems(_with(model={"source": "/models/base", "fromJob": "earlier"}))
        assert problems == ["model.source: set exactly one of source (a model's location) and fromJob (continue "
                            "from an earlier FineTuneJob's model)"]
        problems = _problems(_with(model={"source": "models/base"}))
        assert problems == ["model.source: must be hf://<org>/<name>, pvc://<claim>/<path>, s3://<bucket>/<key>, "
                            "or (local mode) an absolute path or file:///<path>"]
        assert cfg.config_from_dict(_with(model={"source": "hf://org/base"})).model.source == "hf://org/base"

    def test_an_unreadable_or_malformed_file_is_a_config_error(self, tmp_path: Path) -> None:
        (tmp_path / "bad.yaml").write_text("model: [unclosed")
        with pytest.raises(cfg.ConfigError, match="not valid JSON/YAML"):
            config_file.load_config(tmp_path / "bad.yaml")
        with pytest.raises(cfg.ConfigError, match="cannot read"):
            config_file.load_config(tmp_path / "missing.json")


class TestContract:
    def test_exit_codes(self) -> None:
        assert (api_process.EXIT_OK, api_process.EXIT_PERMANENT, api_process.EXIT_PREEMPTED) == (0, 78, 75)

    def test_reading_a_config_file_does_not_import_torch(self) -> None:
        code = "import sys, kubetune.trainer.config_file; print('torch' in sys.modules, 'transformers' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

        assert result.stdout.strip() == "False False"
