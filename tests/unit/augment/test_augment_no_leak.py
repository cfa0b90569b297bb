"""Augmentation inside the real data preparation: only the training split grows; nothing held out leaks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.config import config_from_dict
from kubetune.api.finetunejob import ModelSpec as ModelConfig
from kubetune.trainer.prep import augment, data

from .augment_datasets import sentiment_records, write_jsonl

MARKER = re.compile(r"marker\d+")


def prepared(train: Path, augmentation: dict[str, Any] | None, *, base_model: Path | None = None,
             data_format: str = "classification", **dataset: Any) -> data.PreparedData:
    section: dict[str, Any] = {"format": data_format, "train": {"source": str(train)},
                               "split": {"validation": 0.2, "test": 0.2}, **dataset}
    if augmentation is not None:
        section["augmentation"] = augmentation
    config = config_from_dict({"model": {"source": str(base_model or "/unused")}, "dataset": section,
                               "output": {"dir": "/unused"}})
    return data.prepare(config.dataset, synthetic_model=ModelConfig(source=str(base_model)) if base_model else None)


def markers(examples: list[data.Example]) -> set[str]:
    return {m for e in examples for m in MARKER.findall(augment.input_text(e))}


EDITS = {"enabled": True, "multiplier": 3, "rate": 0.3, "seed": 5}


class TestOnlyTheTrainingSplitIsAugmented:
    def test_validation_and_test_are_identical_to_a_run_without_augmentation(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        plain, augmented = prepared(train, None), prepared(train, EDITS)
        assert augmented.splits.validation == plain.splits.validation
        assert augmented.splits.test == plain.splits.test
        assert repr(augmented.splits.validation).encode() == repr(plain.splits.validation).encode()

    def test_the_training_split_is_the_real_one_plus_multiplier_copies(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        plain, augmented = prepared(train, None), prepared(train, EDITS)
        assert augmented.splits.train[: len(plain.splits.train)] == plain.splits.train
        assert len(augmented.splits.train) == 4 * len(plain.splits.train)
        statistics = augmented.statistics()
        assert statistics["splits"]["train"] == 4 * len(plain.splits.train)
        assert statistics["augmentation"]["added"] == 3 * len(plain.splits.train)
        assert statistics["augmentation"]["realExamples"] == len(plain.splits.train)

    def test_no_held_out_text_appears_in_or_is_derived_into_training(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        augmented = prepared(train, {**EDITS, "operations": ["wordInsertion", "wordSwap", "wordDeletion"]})
        held_out = [*augmented.splits.validation, *augmented.splits.test]
        train_texts = {augment.input_text(e) for e in augmented.splits.train}
        assert not train_texts & {augment.input_text(e) for e in held_out}
        # Every record carries a unique marker word: no held-out marker may reach training, even as an insertion.
        assert markers(held_out) and not markers(held_out) & markers(augmented.splits.train)

    def test_labels_are_preserved_and_label_counts_scale(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        # Deletion and swap never bring in another record's marker word, so a marker names its source.
        plain, augmented = prepared(train, None), prepared(train, {**EDITS, "operations": ["wordDeletion", "wordSwap"]})
        counts = augmented.statistics()["labelCounts"]["train"]
        assert counts == {label: 4 * n for label, n in plain.statistics()["labelCounts"]["train"].items()}
        by_marker = {m: e.label for e in plain.splits.train for m in MARKER.findall(e.prompt)}
        for example in augmented.splits.train:
            for marker in MARKER.findall(example.prompt):
                assert example.label == by_marker[marker]

    def test_imbalance_handling_sees_the_augmented_split(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        augmented = prepared(train, EDITS, imbalance={"strategy": "oversample"})
        before = augmented.statistics()["imbalance"]["before"]
        assert sum(before.values()) == 4 * augmented.statistics()["augmentation"]["realExamples"]

    def test_a_copy_equal_to_a_held_out_example_is_dropped(self, tmp_path: Path) -> None:
        # Two-word texts: deleting a word can produce exactly the held-out one-word text "shared".
        records = [{"text": f"shared w{i}", "label": "a" if i % 2 else "b"} for i in range(12)]
        train = write_jsonl(tmp_path / "train.jsonl", records)
        held = write_jsonl(tmp_path / "held.jsonl", [{"text": "shared", "label": "a"}, {"text": "other", "label": "b"}])
        augmented = prepared(train, {"enabled": True, "operations": ["wordDeletion"], "multiplier": 2},
                             validation={"source": str(held)}, test={"source": str(held)})
        report = augmented.statistics()["augmentation"]
        assert report["droppedMatchingHeldOut"] > 0
        assert report["added"] + report["droppedMatchingHeldOut"] == 2 * report["realExamples"]
        assert "shared" not in {e.prompt for e in augmented.splits.train}

    def test_text_format_augments_plain_text(self, tmp_path: Path) -> None:
        records = [{"text": f"marker{i} the trainer writes a checkpoint after each epoch"} for i in range(30)]
        train = write_jsonl(tmp_path / "train.jsonl", records)
        plain, augmented = prepared(train, None, data_format="text"), prepared(train, EDITS, data_format="text")
        assert augmented.splits.test == plain.splits.test and len(augmented.splits.train) == 4 * len(plain.splits.train)
        assert not markers([*augmented.splits.validation, *augmented.splits.test]) & markers(augmented.splits.train)

    def test_same_seed_same_training_split(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        assert prepared(train, EDITS).splits.train == prepared(train, EDITS).splits.train
        assert prepared(train, EDITS).splits.train != prepared(train, {**EDITS, "seed": 6}).splits.train


@pytest.mark.slow
class TestSyntheticInsidePreparation:
    def test_synthetic_examples_are_added_to_train_only_and_never_equal_a_real_one(
        self, tmp_path: Path, tiny_generator: Path
    ) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        synthetic = {"synthetic": {"enabled": True, "promptTemplate": "Another {label} review like: {text}",
                                   "count": 12, "maxNewTokens": 16, "minChars": 1, "temperature": 0.9}}
        plain = prepared(train, None)
        augmented = prepared(train, synthetic, base_model=tiny_generator)
        assert augmented.splits.validation == plain.splits.validation and augmented.splits.test == plain.splits.test
        report = augmented.statistics()["augmentation"]["synthetic"]
        assert report["generated"] == 12 and report["model"] == str(tiny_generator)
        added = augmented.splits.train[len(plain.splits.train):]
        assert len(added) == report["kept"] > 0
        real = {augment.text_key(augment.input_text(e)) for e in
                [*plain.splits.train, *plain.splits.validation, *plain.splits.test]}
        assert not {augment.text_key(augment.input_text(e)) for e in added} & real
        assert {e.label for e in added} <= {"positive", "negative"}

    def test_without_a_generator_model_synthetic_is_skipped_and_says_so(self, tmp_path: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", sentiment_records())
        augmented = prepared(train, {"synthetic": {"enabled": True, "promptTemplate": "{text}"}})
        report = augmented.statistics()["augmentation"]
        assert report["synthetic"] is None and "validate-only" in report["syntheticSkipped"]
