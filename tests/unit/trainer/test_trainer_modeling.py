"""Finding and preparing the base model: local folders, hub ids, GGUF files, LoRA targets, dropout."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import finetunejob as ftj
from kubetune.trainer.errors import ModelError
from kubetune.trainer.training import modeling


class TestLocate:
    def test_hub_ids_pass_through_without_the_scheme(self) -> None:
        location = modeling.locate(ftj.ModelSpec(source="hf://HuggingFaceTB/SmolLM2-135M", revision="main"))
        assert location.name_or_path == "HuggingFaceTB/SmolLM2-135M"
        assert location.kwargs == {"trust_remote_code": False, "revision": "main"}

    def test_a_missing_local_path_is_permanent(self) -> None:
        with pytest.raises(ModelError, match="model.source: /no/such/model: no such file or directory"):
            modeling.locate(ftj.ModelSpec(source="/no/such/model"))

    def test_a_folder_without_config_json_is_not_a_model(self, tmp_path: Path) -> None:
        with pytest.raises(ModelError, match="has no config.json"):
            modeling.locate(ftj.ModelSpec(source=str(tmp_path)))

    def test_a_missing_gguf_file_lists_the_ones_present(self, tmp_path: Path) -> None:
        (tmp_path / "other.Q4.gguf").write_bytes(b"GGUF")
        with pytest.raises(ModelError, match=r"model.ggufFile: 'model.gguf' not found in .*; GGUF files there: other.Q4.gguf"):
            modeling.locate(ftj.ModelSpec(source=str(tmp_path), gguf_file="model.gguf"))


class TestPreparation:
    def test_dropout_override_reaches_layers_and_config(self, tiny_gpt2: Path) -> None:
        import torch

        model = modeling.load_model(ftj.ModelSpec(source=str(tiny_gpt2)))

        changed = modeling.override_dropout(model, 0.25)

        assert changed > 0
        assert all(m.p == 0.25 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert model.config.resid_pdrop == 0.25

    def test_lora_uses_configured_targets_over_architecture_defaults(self, tiny_gpt2: Path) -> None:
        model = modeling.load_model(ftj.ModelSpec(source=str(tiny_gpt2)))

        assert modeling.lora_target_modules(model, ftj.LoraSettings()) == ["c_attn", "c_proj"]
        assert modeling.lora_target_modules(model, ftj.LoraSettings(target_modules=["c_fc"])) == ["c_fc"]

    def test_lora_targets_that_match_nothing_are_a_permanent_error(self, tiny_gpt2: Path) -> None:
        model = modeling.load_model(ftj.ModelSpec(source=str(tiny_gpt2)))
        with pytest.raises(ModelError, match="method.lora.targetModules"):
            modeling.apply_lora(model, ftj.LoraSettings(target_modules=["q_proj"]))

    def test_lora_trains_only_a_small_fraction(self, tiny_gpt2: Path) -> None:
        model = modeling.apply_lora(modeling.load_model(ftj.ModelSpec(source=str(tiny_gpt2))), ftj.LoraSettings(rank=4))

        total, trainable = modeling.count_parameters(model)

        assert 0 < trainable < total / 10
