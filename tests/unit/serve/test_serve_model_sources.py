"""What `--model` may point to: a model folder, a trainer output, a peft adapter, a GGUF file.

`resolve_model_source` is checked on folder layouts (no weights needed); the
adapter cases are also served over HTTP, with an adapter trained to answer
differently from its base, so the answer proves the adapter was applied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kubetune.trainer.serve.engine import ModelSourceError, resolve_model_source

if TYPE_CHECKING:
    from conftest import Memorised, StartServer

ADAPTER_ANSWER = " watches the job status."
"""What the LoRA adapter teaches the trained tiny model to say after its completion prompt.

The base says " watches the job status every few seconds."; the adapter ends
early. Only words the base already knows: the tiny model's tied output
embeddings of unseen tokens are too small for a LoRA on attention and MLP
layers to make them confident."""


def _touch_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _touch_adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


class TestResolvingTheModelPath:
    def test_a_transformers_folder_is_served_under_its_name(self, tmp_path: Path) -> None:
        source = resolve_model_source(_touch_model(tmp_path / "my-model"))
        assert (source.kind, source.weights_dir, source.default_name) == ("transformers", tmp_path / "my-model", "my-model")

    def test_a_trainer_output_serves_its_model_folder_under_the_output_name(self, tmp_path: Path) -> None:
        _touch_model(tmp_path / "job-7" / "model")
        (tmp_path / "job-7" / "metrics.json").write_text("{}")
        source = resolve_model_source(tmp_path / "job-7")
        assert (source.kind, source.weights_dir, source.default_name) == ("transformers", tmp_path / "job-7" / "model", "job-7")

    def test_a_trainer_output_with_only_an_adapter_loads_base_plus_adapter(self, tmp_path: Path) -> None:
        base = _touch_model(tmp_path / "base")
        _touch_adapter(tmp_path / "job" / "adapter", str(base))
        source = resolve_model_source(tmp_path / "job")
        assert (source.kind, source.weights_dir, source.adapter_dir) == ("adapter", base, tmp_path / "job" / "adapter")
        assert source.tokenizer_dir == base  # the adapter folder has no tokenizer of its own

    def test_an_adapter_on_the_outputs_own_model_folder_is_applied_to_it(self, tmp_path: Path) -> None:
        model = _touch_model(tmp_path / "job" / "model")
        _touch_adapter(tmp_path / "job" / "adapter", str(model))
        source = resolve_model_source(tmp_path / "job")
        assert (source.kind, source.weights_dir) == ("adapter", model)

    def test_next_to_a_merged_model_an_adapter_for_another_base_is_not_applied_twice(self, tmp_path: Path) -> None:
        base = _touch_model(tmp_path / "base")
        _touch_model(tmp_path / "job" / "model")  # the merged model
        _touch_adapter(tmp_path / "job" / "adapter", str(base))
        source = resolve_model_source(tmp_path / "job")
        assert (source.kind, source.weights_dir) == ("transformers", tmp_path / "job" / "model")

    def test_an_adapter_base_may_be_relative_to_the_adapter_folder(self, tmp_path: Path) -> None:
        _touch_model(tmp_path / "base")
        adapter = _touch_adapter(tmp_path / "adapter", "../base")
        (adapter / "tokenizer.json").write_text("{}")
        source = resolve_model_source(adapter)
        assert source.weights_dir == (tmp_path / "base").resolve()
        assert source.tokenizer_dir == adapter  # the adapter carries its own tokenizer

    def test_a_gguf_file_or_a_folder_with_one_is_served_with_gguf_file(self, tmp_path: Path) -> None:
        (tmp_path / "SmolLM2.Q4.gguf").write_bytes(b"GGUF")
        by_file = resolve_model_source(tmp_path / "SmolLM2.Q4.gguf")
        by_folder = resolve_model_source(tmp_path)
        assert (by_file.kind, by_file.gguf_file, by_file.default_name) == ("gguf", "SmolLM2.Q4.gguf", "SmolLM2.Q4")
        assert (by_folder.kind, by_folder.gguf_file, by_folder.default_name) == ("gguf", "SmolLM2.Q4.gguf", tmp_path.name)

    def test_a_folder_with_two_gguf_files_asks_to_pick_one(self, tmp_path: Path) -> None:
        (tmp_path / "a.gguf").write_bytes(b"")
        (tmp_path / "b.gguf").write_bytes(b"")
        with pytest.raises(ModelSourceError, match="found 2 .gguf files, pass one of them"):
            resolve_model_source(tmp_path)

    def test_a_file_that_is_not_gguf_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "model.bin").write_bytes(b"")
        with pytest.raises(ModelSourceError, match="must be a .gguf checkpoint, got model.bin"):
            resolve_model_source(tmp_path / "model.bin")


@pytest.fixture(scope="module")
def lora_adapter_dir(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the trained tiny model that makes it complete the prompt with ADAPTER_ANSWER."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(trained_model_dir),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"]),
    )
    batch = tokenizer(["The operator" + ADAPTER_ANSWER + tokenizer.eos_token], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()  # no dropout: a deterministic, quick fit (LoRA weights still get gradients)
    for _ in range(60):
        model(**batch, labels=batch.input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    prompt = tokenizer("The operator", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    learned = tokenizer.decode(generated[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert learned == ADAPTER_ANSWER, f"the adapter did not learn its answer: {learned!r}"
    path = tmp_path_factory.mktemp("adapters") / "operator-lora"
    model.save_pretrained(path)
    return path


class TestServingAdapters:
    def test_a_peft_adapter_folder_is_served_on_its_base(
        self, start_server: StartServer, lora_adapter_dir: Path, memorised: Memorised
    ) -> None:
        server = start_server("--model", lora_adapter_dir)
        status, answer = server.post_json("/v1/completions", {
            "model": "operator-lora", "prompt": memorised.completion_prompt, "max_tokens": 20, "temperature": 0,
        })  # fmt: skip
        assert status == 200, answer
        assert answer["choices"][0]["text"] == ADAPTER_ANSWER != memorised.completion_answer

    def test_a_trainer_output_with_model_and_adapter_serves_the_adapted_model(
        self, start_server: StartServer, lora_adapter_dir: Path, trained_model_dir: Path, tmp_path: Path, memorised: Memorised
    ) -> None:
        output = tmp_path / "finetune-job"
        shutil.copytree(trained_model_dir, output / "model")
        shutil.copytree(lora_adapter_dir, output / "adapter")
        config_path = output / "adapter" / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(output / "model")
        config_path.write_text(json.dumps(config))

        server = start_server("--model", output, "--served-model-name", "ft")
        assert json.loads(server.get("/v1/models")[1])["data"][0]["id"] == "ft"
        status, answer = server.post_json("/v1/chat/completions", {
            "model": "ft", "temperature": 0, "messages": [{"role": "user", "content": memorised.chat_question}],
        })  # fmt: skip
        assert status == 200, answer  # the chat template comes from model/'s tokenizer
        status, answer = server.post_json("/v1/completions", {
            "model": "ft", "prompt": memorised.completion_prompt, "max_tokens": 20, "temperature": 0,
        })  # fmt: skip
        assert answer["choices"][0]["text"] == ADAPTER_ANSWER
