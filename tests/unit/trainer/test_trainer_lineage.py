"""Training on from an earlier job (`spec.model.fromJob`, resolved by the operator into `model.source`
plus `job.lineage`): the second run starts from the first run's weights — merged model or LoRA adapter —
and its model card records the chain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import process as api_process
from kubetune.dev import tinymodel
from kubetune.trainer.__main__ import main

from .trainer_runs import write_config, write_jsonl

pytestmark = pytest.mark.slow


def corpus(seed: int, count: int) -> list[dict[str, Any]]:
    return [{"text": t} for t in tinymodel.default_corpus(count, seed=seed)]


def run(tmp_path: Path, name: str, source: str, train: Path, validation: Path, method: dict[str, Any],
        **job: Any) -> dict[str, Any]:
    out = tmp_path / name
    content = {
        "model": {"source": source},  # fromJob resolved by the operator: the chain is in job.lineage
        "dataset": {"format": "text", "train": {"source": str(train)}, "validation": {"source": str(validation)},
                    "split": {"validation": 0.0, "test": 0.0}},
        "method": method,
        "hyperparameters": {"epochs": 3, "learningRate": 3e-3, "batchSize": 8, "maxSeqLength": 64, "seed": 1},
        "evaluation": {"baseline": False},
        "output": {"dir": str(out)},
        "job": {"name": name, "namespace": "team-a", **job},
    }
    code = main(["--config", str(write_config(tmp_path / f"{name}.json", content))])
    assert code == api_process.EXIT_OK, (tmp_path / "termination-log").read_text()
    return dict(json.loads((out / "metrics.json").read_text()))


@pytest.mark.parametrize(("method", "folder"), [
    ({"type": "full"}, "model"),
    ({"type": "lora", "lora": {"rank": 8, "alpha": 32, "merge": False}}, "adapter"),
], ids=["merged-model", "lora-adapter"])
def test_job_b_starts_from_job_a_weights_not_the_base_models(
        tmp_path: Path, tiny_gpt2: Path, termination_log: Path, method: dict[str, Any], folder: str) -> None:
    data_a = write_jsonl(tmp_path / "a-train.jsonl", corpus(seed=1, count=240))
    held_out_a = write_jsonl(tmp_path / "a-val.jsonl", corpus(seed=2, count=40))
    data_b = write_jsonl(tmp_path / "b-train.jsonl", corpus(seed=3, count=120))

    first = run(tmp_path, "job-a", str(tiny_gpt2), data_a, held_out_a, method)
    assert first["valLoss"] < first["initialValLoss"] - 0.3  # A learned something B can start from

    a_model = tmp_path / "job-a" / folder
    lineage = [{"uri": str(tiny_gpt2)}, {"job": "job-a", "uri": str(a_model), "digest": first["model"]["digest"]}]
    # B trains on new data; its validation set is A's, so its loss before the first step is measured
    # on A's data with the weights B starts from.
    second = run(tmp_path, "job-b", str(a_model), data_b, held_out_a, method, lineage=lineage)

    print(f"\n[{folder}] val loss on A's data: base model {first['initialValLoss']:.4f}, A after training "
          f"{first['valLoss']:.4f}, B before its first step {second['initialValLoss']:.4f}")
    assert second["initialValLoss"] == pytest.approx(first["valLoss"], abs=0.02)
    assert second["initialValLoss"] < first["initialValLoss"] - 0.3  # not the base model's loss
    card = (tmp_path / "job-b" / "README.md").read_text()
    assert "## Lineage" in card
    assert f"`{tiny_gpt2}` → job-a (`{a_model}`, {first['model']['digest']}) → job-b" in card
    if folder == "adapter":
        # Trained on, not stacked: B saves one adapter on the original base model.
        adapter_config = json.loads((tmp_path / "job-b" / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(tiny_gpt2)
        assert adapter_config["r"] == 8
