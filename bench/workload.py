"""The trainer benchmarks' shared workload: a GPT-2-shaped model and instruction-like data, built locally.

Imported by the scripts in `bench/` (they run as `python bench/<script>.py`,
so this folder is on the import path). Nothing here is timed.

- `create_bench_model` writes a model folder like `kubetune.dev.tinymodel`'s
  (same locally trained byte-level BPE tokenizer), but with a transformer
  large enough that forward/backward, not Python, dominates a step on a CPU.
- `instruction_like_texts` makes texts whose lengths follow the long-tailed
  shape of real instruction data: many short examples, a few long ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
from pathlib import Path
from typing import Any

from kubetune.dev import tinymodel


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A GPT-2-style transformer shape."""

    layers: int
    """Transformer blocks."""
    width: int
    """Hidden size (n_embd)."""
    heads: int
    """Attention heads."""
    positions: int = 1024
    """Longest sequence the model accepts."""
    vocab: int | None = None
    """Vocabulary size; None: the tiny tokenizer's (a real model's vocabulary makes the output layer and
    the loss as costly as they are in practice)."""

    def describe(self) -> str:
        vocab = f", vocabulary {self.vocab}" if self.vocab else ""
        return f"GPT-2-shaped, {self.layers} layers x {self.width} wide, {self.heads} heads{vocab}"


BENCH_SHAPE = ModelShape(layers=4, width=256, heads=4)
"""The CPU throughput model: ~3.5M parameters, compute-bound on a CPU at a few hundred tokens per sequence."""
QUICK_SHAPE = ModelShape(layers=2, width=64, heads=2)
"""`--quick` runs (smoke tests): the tiny model's shape."""
GPT2_124M_SHAPE = ModelShape(layers=12, width=768, heads=12, vocab=50257)
"""GPT-2's smallest size, for GPU runs (bench/gpu_suite.sh)."""
SHAPES = {"bench": BENCH_SHAPE, "quick": QUICK_SHAPE, "gpt2-124m": GPT2_124M_SHAPE}


def create_bench_model(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    """A model folder with the tiny model's tokenizer and a randomly initialised GPT-2 of `shape`."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tinymodel.create_tiny_model(folder, arch="gpt2", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GPT2Config(
        vocab_size=shape.vocab or len(tokenizer),
        n_positions=shape.positions,
        n_embd=shape.width,
        n_layer=shape.layers,
        n_head=shape.heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def instruction_like_texts(count: int, seed: int, max_sentences: int = 24) -> list[str]:
    """Texts of 1..max_sentences sentences, log-normally distributed (median ~2, a long tail).

    With the tiny tokenizer a sentence is ~10 tokens, so most texts are 10-40
    tokens and a few reach ~250: the shape of instruction-tuning sets, where
    padding every batch to its longest example wastes most of the compute.
    """
    rng = random.Random(seed)
    sentences = tinymodel.default_corpus(size=4000, seed=seed)
    texts = []
    for index in range(count):
        length = min(max_sentences, max(1, round(math.exp(rng.gauss(0.7, 0.9)))))
        body = " ".join(rng.choice(sentences) for _ in range(length))
        texts.append(f"{index}: {body}")  # the index keeps every text unique (cleaning dedupes)
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hardware_line() -> str:
    """What the figures were measured on (they mean little without it)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"no GPU: CPU figures ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"load average {load:.1f} at start), torch {torch.__version__}")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
