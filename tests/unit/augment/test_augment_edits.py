"""Label-preserving edits: multiplier and rate honoured, labels kept, training vocabulary only, seeded."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from kubetune.api.finetunejob import AUGMENTATION_OPERATIONS
from kubetune.api.finetunejob import Augmentation, DataSource, DatasetSpec as DatasetConfig
from kubetune.trainer.prep import augment
from kubetune.trainer.prep.data import Example, Splits, classification_completion

SENTENCE = "the operator watches every pod and reports the job status after each epoch"  # 13 words


def labelled(text: str, label: str) -> Example:
    return Example(prompt=text, completion=classification_completion(label), label=label)


def training_set() -> list[Example]:
    words = SENTENCE.split()
    rng = random.Random(0)
    examples = []
    for i in range(20):
        rng.shuffle(words)
        examples.append(labelled(" ".join(words) + f" item{i}", "positive" if i % 2 else "negative"))
    return examples


def dataset(**augmentation: object) -> DatasetConfig:
    return DatasetConfig(train=DataSource(source="/unused"), format="classification",
                         augmentation=Augmentation(enabled=True, **augmentation))  # type: ignore[arg-type]


class TestMultiplier:
    @pytest.mark.parametrize("multiplier", [1, 3, 10])
    def test_adds_multiplier_copies_of_every_real_example(self, multiplier: int) -> None:
        train = training_set()
        augmented, report = augment.augment_training_split(Splits(train, [], []), dataset(multiplier=multiplier), None)
        assert augmented[: len(train)] == train, "the real examples come first, unchanged"
        assert len(augmented) == len(train) * (1 + multiplier)
        assert report.added == len(train) * multiplier and report.real_examples == len(train)
        assert sum(report.by_operation.values()) == report.added

    def test_every_operation_is_used_when_all_are_allowed(self) -> None:
        _, report = augment.augment_training_split(Splits(training_set(), [], []), dataset(multiplier=4), None)
        assert set(report.by_operation) == set(AUGMENTATION_OPERATIONS)

    def test_only_the_chosen_operations_are_used(self) -> None:
        copies = augment.edited_copies(training_set(), Augmentation(enabled=True, operations=["wordSwap"], multiplier=3))
        assert {operation for _, operation, _ in copies} == {"wordSwap"}
        for index, _, copy in copies:
            assert sorted(copy.prompt.split()) == sorted(training_set()[index].prompt.split())


class TestRate:
    """Each copy makes max(1, round(rate x words)) edits (characters for charNoise)."""

    @pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
    def test_word_deletion_removes_rate_of_the_words(self, rate: float) -> None:
        words = SENTENCE.split()
        edited = augment.delete_words(SENTENCE, rate, random.Random(1)).split()
        assert len(edited) == len(words) - max(1, round(rate * len(words)))
        assert all(Counter(edited)[w] <= Counter(words)[w] for w in edited), "only deletions, in order"

    @pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
    def test_word_insertion_adds_rate_of_the_words_from_the_vocabulary(self, rate: float) -> None:
        vocabulary = ["alpha", "beta"]
        edited = augment.insert_words(SENTENCE, rate, random.Random(1), vocabulary).split()
        added = Counter(edited) - Counter(SENTENCE.split())
        assert sum(added.values()) == max(1, round(rate * 13))
        assert set(added) <= set(vocabulary)

    @pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
    def test_word_swap_moves_at_most_two_words_per_edit(self, rate: float) -> None:
        edited = augment.swap_words(SENTENCE, rate, random.Random(1)).split()
        moved = sum(a != b for a, b in zip(edited, SENTENCE.split()))
        assert sorted(edited) == sorted(SENTENCE.split())
        assert 0 < moved <= 2 * max(1, round(rate * 13))

    @pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
    def test_char_noise_changes_about_rate_of_the_characters(self, rate: float) -> None:
        edits = max(1, round(rate * sum(not c.isspace() for c in SENTENCE)))
        edited = augment.char_noise(SENTENCE, rate, random.Random(1), "xyz")
        # Each typo changes at most two characters (a transposition), and the length by at most one.
        assert abs(len(edited) - len(SENTENCE)) <= edits
        assert 0 < levenshtein(edited, SENTENCE) <= 2 * edits

    def test_a_higher_rate_edits_more(self) -> None:
        train = training_set()
        low = augment.edited_copies(train, Augmentation(enabled=True, operations=["charNoise"], rate=0.02))
        high = augment.edited_copies(train, Augmentation(enabled=True, operations=["charNoise"], rate=0.3))
        distance = lambda copies: sum(levenshtein(c.prompt, train[i].prompt) for i, _, c in copies)  # noqa: E731
        assert distance(high) > 3 * distance(low)

    def test_a_one_word_text_is_never_deleted_to_nothing(self) -> None:
        assert augment.delete_words("hello", 0.5, random.Random(0)) == "hello"


class TestLabelsAndTargets:
    def test_edits_change_only_the_text_and_keep_label_completion_and_weight(self) -> None:
        train = [dataclass_with_weight(e, 2.5) for e in training_set()]
        for index, _, copy in augment.edited_copies(train, Augmentation(enabled=True, multiplier=3)):
            source = train[index]
            assert (copy.label, copy.completion, copy.weight, copy.messages) == (
                source.label, source.completion, source.weight, None)
        changed = [c for i, _, c in augment.edited_copies(train, Augmentation(enabled=True, multiplier=3))
                   if c.prompt != train[i].prompt]
        assert len(changed) >= 0.9 * 3 * len(train)

    def test_plain_text_examples_edit_their_text(self) -> None:
        train = [Example(completion=SENTENCE)]
        (_, _, copy), = augment.edited_copies(train, Augmentation(enabled=True, operations=["wordDeletion"]))
        assert copy.prompt == "" and copy.label is None and len(copy.completion.split()) == 12


class TestVocabulary:
    def test_inserted_words_come_from_the_training_split_only(self) -> None:
        train = [labelled("alpha beta gamma delta", "a"), labelled("epsilon zeta eta theta", "b")]
        held_out = [labelled("forbidden words only here", "a")]
        augmented, _ = augment.augment_training_split(
            Splits(train, held_out, held_out), dataset(operations=["wordInsertion"], multiplier=10, rate=0.5), None)
        train_words = {w for e in train for w in e.prompt.split()}
        assert {w for e in augmented for w in e.prompt.split()} <= train_words

    def test_vocabulary_is_the_distinct_words_without_punctuation_or_numbers(self) -> None:
        assert augment.vocabulary([labelled("Hello, world! 42 it's ok.", "a")]) == ["Hello", "it's", "ok", "world"]


class TestDeterminism:
    def test_same_seed_same_copies(self) -> None:
        settings = Augmentation(enabled=True, multiplier=3, seed=7)
        assert augment.edited_copies(training_set(), settings) == augment.edited_copies(training_set(), settings)

    def test_another_seed_other_copies(self) -> None:
        first = augment.edited_copies(training_set(), Augmentation(enabled=True, multiplier=3, seed=7))
        second = augment.edited_copies(training_set(), Augmentation(enabled=True, multiplier=3, seed=8))
        assert sum(a != b for a, b in zip(first, second)) > len(first) // 2

    def test_an_example_copy_does_not_depend_on_the_global_random_state(self) -> None:
        settings = Augmentation(enabled=True, seed=7)
        random.seed(1)
        first = augment.edited_copies(training_set(), settings)
        random.seed(2)
        assert augment.edited_copies(training_set(), settings) == first


def dataclass_with_weight(example: Example, weight: float) -> Example:
    import dataclasses

    return dataclasses.replace(example, weight=weight)


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def test_sentence_has_thirteen_words() -> None:
    assert len(re.findall(r"\S+", SENTENCE)) == 13
