"""The spec renders into the trainer's config, with PVC sources turned into mount paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kubetune.api import config as trainer_config
from kubetune.operator.jobs import render


def test_a_valid_spec_renders_a_config_the_trainer_accepts(make_job: Callable[..., dict[str, Any]]) -> None:
    rendered = render.trainer_config_for(make_job(method={"type": "lora", "lora": {"rank": 4}}))
    assert rendered.config["model"] == {"source": "/mnt/pvc/models/base/gpt2"}
    assert rendered.config["dataset"]["train"] == {"source": "/mnt/pvc/data/train.jsonl"}
    assert rendered.config["method"] == {"type": "lora", "lora": {"rank": 4}}
    assert rendered.config["output"] == {"dir": "/mnt/pvc/models/finetunes/demo",
                                         "checkpointDir": "/mnt/pvc/models/finetunes/demo/checkpoints"}
    assert rendered.config["job"] == {"namespace": "team-a", "name": "demo", "uid": "uid-1"}
    assert rendered.claims == ("data", "models")
    assert rendered.model_uri == "pvc://models/finetunes/demo/model"
    trainer_config.config_from_dict(rendered.config)


def test_name_suffix_and_non_pvc_sources(make_job: Callable[..., dict[str, Any]]) -> None:
    job = make_job(model={"source": "hf://org/tiny"}, output={"storage": "pvc://out/runs/", "nameSuffix": "v2"},
                   dataset={"format": "text", "train": {"source": "https://example.test/train.jsonl"}})
    rendered = render.trainer_config_for(job)
    assert rendered.config["model"]["source"] == "hf://org/tiny"
    assert rendered.config["dataset"]["train"]["source"] == "https://example.test/train.jsonl"
    assert rendered.config["output"]["dir"] == "/mnt/pvc/out/runs/demo-v2"
    assert rendered.claims == ("out",)


def test_equal_specs_render_byte_identical_config(make_job: Callable[..., dict[str, Any]]) -> None:
    assert render.trainer_config_for(make_job()).config_json() == render.trainer_config_for(make_job()).config_json()


@pytest.mark.parametrize(("change", "problem"), [
    ({"output": {}}, "spec.output.storage: required"),
    ({"model": {"source": "pvc://Bad_Claim/x"}}, "spec.model.source: 'pvc://Bad_Claim/x' must be pvc://"),
    ({"model": {"source": "pvc://models/../etc"}}, "spec.model.source: 'pvc://models/../etc' must not contain '..'"),
    ({"hyperparameters": {"learningRate": -1}}, "spec.hyperparameters.learningRate: must be > 0"),
    ({"dataset": {"format": "qa", "train": {"source": "/x"}}}, "spec.dataset.format: must be one of"),
])
def test_bad_specs_are_rejected_naming_the_field(make_job: Callable[..., dict[str, Any]], change: dict[str, Any],
                                                 problem: str) -> None:
    with pytest.raises(render.SpecError) as caught:
        render.trainer_config_for(make_job(**change))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_every_problem_is_listed_at_once(make_job: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(render.SpecError) as caught:
        render.trainer_config_for(make_job(output={}, model={"source": "pvc://UPPER/x"}))
    assert len(caught.value.problems) == 2
