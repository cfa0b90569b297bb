"""Classification runs report accuracy and macro-F1 at every validation, and can stop early on valF1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import config as cfg, process as api_process
from kubetune.trainer.__main__ import main
from kubetune.trainer.training import train

from .trainer_runs import classification_records, config, text_records, write_config, write_jsonl


@pytest.fixture
def no_reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(api_process.ENV_TERMINATION_LOG, str(tmp_path / "termination-log"))
    monkeypatch.delenv(api_process.ENV_PROGRESS_URL, raising=False)


@pytest.mark.slow
def test_every_validation_of_a_classification_run_has_accuracy_and_macro_f1(
        tmp_path: Path, tiny_gpt2: Path, no_reports: None) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", classification_records())
    out = tmp_path / "out"
    content = config(tiny_gpt2, train_file, out, dataset={"format": "classification", "split": {"validation": 0.2}},
                     training={"evalInterval": 3, "earlyStopping": {"enabled": True, "metric": "valF1",
                                                                   "patience": 1, "minDelta": 1.0}})
    assert main(["--config", str(write_config(tmp_path / "config.json", content))]) == api_process.EXIT_OK

    metrics = json.loads((out / "metrics.json").read_text())
    evaluations = metrics["history"]["evaluations"]
    assert len(evaluations) >= 2
    for point in evaluations:
        assert 0.0 <= point["valAccuracy"] <= 1.0 and 0.0 <= point["valF1"] <= 1.0, point
    # F1 cannot improve by minDelta 1.0: the first validation during training sets the best, the next stops.
    assert metrics["stoppedEarly"] is True


@pytest.mark.slow
def test_a_text_run_has_no_classification_figures(tmp_path: Path, tiny_gpt2: Path, no_reports: None) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", text_records(60))
    out = tmp_path / "out"
    content = config(tiny_gpt2, train_file, out, hyperparameters={"epochs": 1})
    assert main(["--config", str(write_config(tmp_path / "config.json", content))]) == api_process.EXIT_OK
    evaluations = json.loads((out / "metrics.json").read_text())["history"]["evaluations"]
    assert evaluations and not any("valF1" in e or "valAccuracy" in e for e in evaluations)


class TestF1IsMaximized:
    def test_higher_f1_is_an_improvement_lower_is_not(self) -> None:
        assert train._is_better(0.8, 0.7, "valF1", 0.0)
        assert not train._is_better(0.6, 0.7, "valF1", 0.0)
        assert not train._is_better(0.75, 0.7, "valF1", 0.1)

    def test_valf1_needs_classification(self) -> None:
        with pytest.raises(cfg.ConfigError, match=r"training.earlyStopping.metric: valAccuracy needs dataset.format "
                                                  r"classification \(valF1 too\)"):
            cfg.config_from_dict({"model": {"source": "/m"},
                                  "dataset": {"format": "text", "train": {"source": "/t.jsonl"}},
                                  "training": {"earlyStopping": {"enabled": True, "metric": "valF1"}},
                                  "output": {"dir": "/o"}})
