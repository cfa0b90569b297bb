"""The tiny model factory: a complete, loadable, deterministic Hugging Face model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.dev import tinymodel


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_model_loads_as_a_causal_lm_with_two_layers(tmp_path: Path, arch: str) -> None:
    path = tinymodel.create_tiny_model(tmp_path / arch, arch=arch)

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    assert (path / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 2
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer) <= tinymodel.VOCAB_SIZE
    ids = tokenizer("The operator watches every pod.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_has_eos_pad_and_a_chat_template_that_marks_the_assistant(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tinymodel.create_tiny_model(tmp_path / "m"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]

    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)

    assert tokenizer.eos_token == tinymodel.EOS_TOKEN
    assert tokenizer.pad_token == tinymodel.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n"
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "hello there<|im_end|>"


def test_byte_level_tokenizer_round_trips_text_it_never_saw(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tinymodel.create_tiny_model(tmp_path / "m", corpus=["aaa bbb"] * 10))
    text = "Ünïcödé ☃ and 123 {json: true}"

    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    first = tinymodel.create_tiny_model(tmp_path / "a", seed=3)
    second = tinymodel.create_tiny_model(tmp_path / "b", seed=3)
    third = tinymodel.create_tiny_model(tmp_path / "c", seed=4)

    assert _digest(first / "model.safetensors") == _digest(second / "model.safetensors")
    assert _digest(first / "tokenizer.json") == _digest(second / "tokenizer.json")
    assert _digest(first / "model.safetensors") != _digest(third / "model.safetensors")


def test_empty_corpus_is_refused_with_a_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="corpus"):
        tinymodel.create_tiny_model(tmp_path / "m", corpus=[])
