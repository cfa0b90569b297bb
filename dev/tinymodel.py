"""Tiny causal language models for tests, local mode and demos.

`create_tiny_model(path)` writes a complete Hugging Face model folder (config,
safetensors weights, a fast tokenizer with a chat template) for a 2-layer,
64-wide causal LM. Everything is built locally: the tokenizer is a byte-level
BPE trained with the `tokenizers` library on a small built-in corpus (or one
you pass), the weights are randomly initialised from a seed. No hub access.

The result loads with `AutoModelForCausalLM.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` like any hub model, so the trainer, the
server and the end-to-end tests exercise the same code paths they use for real
models, in seconds on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

Architecture = Literal["gpt2", "llama"]

EOS_TOKEN = "<|endoftext|>"
"""End of text; also the beginning-of-sequence token (GPT-2 convention)."""
PAD_TOKEN = "<|pad|>"
"""A dedicated padding token, so padding never looks like an end of text."""
CHAT_START = "<|im_start|>"
"""Opens a chat turn (ChatML convention, as SmolLM2 and Qwen use)."""
CHAT_END = "<|im_end|>"
"""Closes a chat turn."""
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, CHAT_START, CHAT_END)

VOCAB_SIZE = 512
"""Target BPE vocabulary: 256 bytes + 4 special tokens + ~250 merges."""
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 2
MAX_POSITIONS = 512
"""Longest sequence the tiny model accepts (position embeddings / RoPE range)."""

# ChatML, the format SmolLM2-Instruct uses. `{% generation %}` marks what the
# assistant says, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
# can tell completion tokens from prompt tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = (
    "The operator", "A trainer pod", "The scheduler", "Each node", "The model",
    "A small cluster", "The dataset", "Our team", "The controller", "A checkpoint",
)
_VERBS = (
    "watches", "reads", "writes", "schedules", "evaluates", "restarts",
    "reports", "saves", "loads", "validates",
)
_OBJECTS = (
    "the job status", "a new checkpoint", "the training data", "the loss curve",
    "every pod", "the learning rate", "the validation split", "a config map",
    "the token counts", "the final metrics",
)
_ENDINGS = (
    "every few seconds.", "before the deadline.", "when the node is ready.",
    "after each epoch.", "without any retries.", "on a single GPU.",
    "in the default namespace.", "while the queue is busy.", "as the spec says.",
    "once the data is clean.",
)


def default_corpus(size: int = 400, seed: int = 0) -> list[str]:
    """Simple English sentences about clusters and training, deterministic for a seed.

    Enough varied text for a 512-token BPE vocabulary and for a tiny model to
    show a falling loss within a few dozen steps.
    """
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}"
        for _ in range(size)
    ]


def train_tokenizer(corpus: Sequence[str], vocab_size: int = VOCAB_SIZE):  # type: ignore[no-untyped-def]
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus`.

    Byte-level means any input text encodes (no unknown token), the property
    real GPT-style tokenizers have.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def _fast_tokenizer(corpus: Sequence[str]):  # type: ignore[no-untyped-def]
    """Wrap the trained tokenizer as a transformers fast tokenizer with chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(corpus),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[CHAT_START, CHAT_END],
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _model_config(arch: Architecture, vocab_size: int, eos_id: int, pad_id: int):  # type: ignore[no-untyped-def]
    """A 2-layer, 64-wide configuration of the requested architecture."""
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=MAX_POSITIONS,
            n_embd=HIDDEN_SIZE,
            n_layer=NUM_LAYERS,
            n_head=NUM_HEADS,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN_SIZE,
            intermediate_size=HIDDEN_SIZE * 2,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            num_key_value_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=True,
        )
    raise ValueError(f"arch: must be 'gpt2' or 'llama', got {arch!r}")


def create_tiny_model(
    path: str | Path,
    *,
    arch: Architecture = "gpt2",
    corpus: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny causal LM and its tokenizer to `path` and return `path`.

    Same arguments, same files: the tokenizer training is deterministic and
    the weights come from `torch.manual_seed(seed)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else default_corpus(seed=seed)
    if not texts:
        raise ValueError("corpus: must hold at least one text to train the tokenizer on")

    tokenizer = _fast_tokenizer(texts)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = _model_config(arch, len(tokenizer), eos_id, pad_id)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(CHAT_END)], pad_token_id=pad_id
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
