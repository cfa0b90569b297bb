"""Every manifest under examples/ is a FineTuneJob that parses into the typed model and renders a trainer config.

tests/integration/api/ submits the same files to the real API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import finetunejob as models
from kubetune.operator.jobs import render

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*.yaml") if "data" not in p.relative_to(REPO / "examples").parts
                  and yaml.safe_load(p.read_text()).get("kind") == "FineTuneJob")


def load(path: Path) -> dict[str, Any]:
    body = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(body, dict), path
    return body


def test_there_are_at_least_five_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
class TestEveryExample:
    def test_is_a_commented_finetunejob(self, path: Path) -> None:
        body = load(path)
        assert (body["apiVersion"], body["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")
        assert "namespace" not in body["metadata"], "examples apply into the current namespace"
        assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "an example opens with what it shows"

    def test_parses_into_the_typed_model(self, path: Path) -> None:
        spec = models.FineTuneJobSpec.from_dict(load(path)["spec"])
        assert models.FineTuneJobSpec.from_dict(spec.to_dict()) == spec

    def test_renders_a_valid_trainer_config(self, path: Path) -> None:
        body = load(path)
        defaulted = {**body, "metadata": {**body["metadata"], "namespace": "team", "uid": "uid-1"},
                     "spec": models.FineTuneJobSpec.from_dict(body["spec"]).to_dict()}
        rendered = render.trainer_config_for(defaulted)
        assert rendered.config["model"]["source"]


def test_the_examples_cover_every_format_and_method() -> None:
    specs = [models.FineTuneJobSpec.from_dict(load(p)["spec"]) for p in EXAMPLES]
    assert {s.dataset.format for s in specs} == {"text", "prompt_completion", "chat", "classification"}
    assert {s.method.type for s in specs} == {"full", "lora"}
    assert any(s.dataset.imbalance.strategy != "none" for s in specs)
    assert any(s.resources and s.resources.queue_name and s.resources.gpu_count() > 1 and s.serving
               and s.serving.enabled for s in specs)
