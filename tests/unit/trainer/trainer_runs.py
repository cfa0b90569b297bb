"""Helpers for tests that run the whole trainer: datasets and configs on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kubetune.dev import tinymodel


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(count: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    return [{"text": t} for t in tinymodel.default_corpus(count, seed=seed)]


def classification_records(count: int = 120, seed: int = 2) -> list[dict[str, Any]]:
    """Separable toy sentiment: the label is decided by the words in the text."""
    rng = random.Random(seed)
    good = ["great", "fast", "stable", "clean", "quick"]
    bad = ["slow", "broken", "flaky", "stuck", "failing"]
    records = []
    for i in range(count):
        label = "positive" if i % 3 else "negative"
        words = good if label == "positive" else bad
        records.append({"text": f"The job was {rng.choice(words)} and {rng.choice(words)} today {i}.", "label": label})
    return records


def config(model: Path, train: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast config: full fine-tuning, fixed hyperparameters, eval every 5 steps."""
    base: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(train)}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": 2, "learningRate": 3e-3, "batchSize": 8, "gradientAccumulationSteps": 1},
        "training": {"evalInterval": 5},
        "output": {"dir": str(out)},
    }
    for name, section in sections.items():
        base.setdefault(name, {}).update(section)
    return base


def write_config(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(json.dumps(content))
    return path
