"""Small datasets for the augmentation tests, written as JSON Lines."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sentiment_records(count: int = 60, seed: int = 3) -> list[dict[str, Any]]:
    """Toy sentiment with a distinct marker word per record, so any leak of a record is visible."""
    rng = random.Random(seed)
    good = ["great", "fast", "stable", "clean", "quick"]
    bad = ["slow", "broken", "flaky", "stuck", "failing"]
    records = []
    for i in range(count):
        label = "positive" if i % 3 else "negative"
        words = good if label == "positive" else bad
        records.append({"text": f"The job marker{i} was {rng.choice(words)} and {rng.choice(words)} today.",
                        "label": label})
    return records
