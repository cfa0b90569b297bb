"""Augmentation of the training split: label-preserving edits and model-generated examples.

It runs inside data preparation after cleaning and splitting, on the training
split only, and before imbalance handling and tokenisation (see
`data.prepare`). Validation and test examples are never edited, never used as
seeds and never a source of inserted words; an augmented or synthetic example
whose text equals a held-out one is dropped, so nothing of the held-out data
reaches training through augmentation.

Two independent parts:

- Edits (`dataset.augmentation.enabled`, formats `text` and `classification`):
  `multiplier` copies of every real training example, each with one operation
  drawn from `operations` applied `max(1, round(rate × words))` times (characters
  for `charNoise`). Only the text changes; the label and weight are copied.
  Inserted words come from the training split's own vocabulary.
- Synthetic (`dataset.augmentation.synthetic.enabled`, any format): `count`
  seed examples drawn from the training split fill `promptTemplate`; a model
  (the base model unless `synthetic.model` says otherwise) writes a new input
  side (text, prompt, or first user message); the seed's target side (label,
  completion, assistant turns) is copied. Generations are whitespace
  normalised, cut at the first blank line, then filtered by length and deduped
  against every real example (train, validation and test) and each other.

Every random choice comes from `random.Random(f"{seed}:{part}:{index}:{copy}")`:
the same seed and data give the same examples, whatever else runs.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from kubetune.api.finetunejob import Augmentation, DatasetSpec, ModelSpec, SyntheticAugmentation
from kubetune.trainer.prep.examples import Example, Splits, normalize_whitespace

log = logging.getLogger(__name__)

_WORD = re.compile(r"(\S+)(\s*)")
_VOCABULARY_WORD = re.compile(r"[^\W\d_][\w'-]*")
GENERATION_BATCH_SIZE = 8
"""Prompts generated together (left-padded)."""


# --- The input side of an example -------------------------------------------------------


def input_text(example: Example) -> str:
    """The text augmentation rewrites: the text (format text), the text before the label
    (classification), the prompt (prompt_completion) or the first user message (chat)."""
    if example.messages is not None:
        return next((m["content"] for m in example.messages if m["role"] == "user"), "")
    if example.label is not None or example.prompt:
        return example.prompt
    return example.completion


def with_input_text(example: Example, text: str) -> Example:
    """A copy of `example` with its input side replaced; label, completion and weight are kept."""
    if example.messages is not None:
        messages = [dict(m) for m in example.messages]
        user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if user is None:
            messages.insert(0, {"role": "user", "content": text})
        else:
            messages[user]["content"] = text
        return dataclasses.replace(example, messages=messages)
    if example.label is not None or example.prompt:
        return dataclasses.replace(example, prompt=text)
    return dataclasses.replace(example, completion=text)


def text_key(text: str) -> str:
    """What two texts must share to count as the same (exact match after whitespace normalisation)."""
    return normalize_whitespace(text)


# --- Edits ----------------------------------------------------------------------------------


def example_rng(seed: int, part: str, index: int, copy: int = 0) -> random.Random:
    """The random stream of one augmented example: a pure function of its coordinates."""
    return random.Random(f"{seed}:{part}:{index}:{copy}")


def vocabulary(examples: Sequence[Example]) -> list[str]:
    """Distinct words of the examples' input sides, sorted (word insertion draws from these)."""
    return sorted({word for e in examples for word in _VOCABULARY_WORD.findall(input_text(e))})


def edit_count(units: int, rate: float) -> int:
    """Edits for a text of `units` words (or characters): `rate` of them, at least one."""
    return max(1, round(rate * units))


def _words(text: str) -> list[list[str]]:
    """[word, whitespace after it] pairs; joining them gives the text back (less leading space)."""
    return [[word, space] for word, space in _WORD.findall(text)]


def _joined(pairs: list[list[str]]) -> str:
    """The text of [word, space] pairs; a word moved to the end no longer runs into the next one."""
    return "".join(word + (space or " ") for word, space in pairs).strip()


def delete_words(text: str, rate: float, rng: random.Random) -> str:
    """Remove `edit_count` words (keeping at least one)."""
    pairs = _words(text)
    removals = min(edit_count(len(pairs), rate), len(pairs) - 1)
    for _ in range(max(0, removals)):
        index = rng.randrange(len(pairs))
        if index == len(pairs) - 1 and index > 0:
            pairs[index - 1][1] = pairs[index][1]  # the new last word takes the text's ending
        del pairs[index]
    return _joined(pairs)


def swap_words(text: str, rate: float, rng: random.Random) -> str:
    """Exchange `edit_count` random pairs of words; spacing stays where it was."""
    pairs = _words(text)
    if len(pairs) < 2:
        return text
    for _ in range(edit_count(len(pairs), rate)):
        first, second = rng.sample(range(len(pairs)), 2)
        pairs[first][0], pairs[second][0] = pairs[second][0], pairs[first][0]
    return _joined(pairs)


def insert_words(text: str, rate: float, rng: random.Random, words: Sequence[str]) -> str:
    """Insert `edit_count` words drawn from `words` at random positions."""
    pairs = _words(text)
    if not words:
        return text
    for _ in range(edit_count(len(pairs), rate)):
        pairs.insert(rng.randint(0, len(pairs)), [rng.choice(words), " "])
    return _joined(pairs)


def char_noise(text: str, rate: float, rng: random.Random, alphabet: str) -> str:
    """Typos at `edit_count(characters)` positions: substitute, delete, duplicate or transpose a
    non-space character; substitutes come from `alphabet` (the training split's letters)."""
    chars = list(text)
    for _ in range(edit_count(sum(not c.isspace() for c in chars), rate)):
        positions = [i for i, c in enumerate(chars) if not c.isspace()]
        if len(positions) < 2:
            break
        at = rng.choice(positions)
        kind = rng.randrange(4)
        if kind == 0 and alphabet:
            chars[at] = rng.choice(alphabet)
        elif kind == 1:
            del chars[at]
        elif kind == 2:
            chars.insert(at, chars[at])
        elif at + 1 < len(chars) and not chars[at + 1].isspace():
            chars[at], chars[at + 1] = chars[at + 1], chars[at]
        else:
            del chars[at]
    return "".join(chars).strip()


@dataclasses.dataclass
class EditVocabulary:
    """What the edits may draw from: the training split only."""

    words: list[str]
    alphabet: str

    @classmethod
    def of(cls, train: Sequence[Example]) -> EditVocabulary:
        letters = sorted({c for e in train for c in input_text(e) if c.isalpha()})
        return cls(words=vocabulary(train), alphabet="".join(letters))


def edited_text(text: str, operation: str, rate: float, rng: random.Random, vocab: EditVocabulary) -> str:
    if operation == "wordDeletion":
        return delete_words(text, rate, rng)
    if operation == "wordSwap":
        return swap_words(text, rate, rng)
    if operation == "wordInsertion":
        return insert_words(text, rate, rng, vocab.words)
    if operation == "charNoise":
        return char_noise(text, rate, rng, vocab.alphabet)
    raise ValueError(f"unknown augmentation operation {operation!r}")


def edited_copies(train: Sequence[Example], settings: Augmentation) -> list[tuple[int, str, Example]]:
    """`multiplier` edited copies of every example as (source index, operation, copy), in order."""
    vocab = EditVocabulary.of(train)
    copies = []
    for index, example in enumerate(train):
        for copy in range(settings.multiplier):
            rng = example_rng(settings.seed, "edit", index, copy)
            operation = rng.choice(settings.operations)
            text = edited_text(input_text(example), operation, settings.rate, rng, vocab)
            copies.append((index, operation, with_input_text(example, text)))
    return copies


# --- Synthetic examples ---------------------------------------------------------------------

Generate = Callable[[list[str]], list[str]]
"""Turns prompts into generated continuations (the new text only), one per prompt, in order."""


@dataclasses.dataclass
class SyntheticReport:
    generated: int = 0
    kept: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicate: int = 0
    model: str = ""

    def to_report(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "generated": self.generated,
            "kept": self.kept,
            "droppedTooShort": self.too_short,
            "droppedTooLong": self.too_long,
            "droppedDuplicate": self.duplicate,
        }


def fill_template(template: str, seed_example: Example) -> str:
    """The template with `{text}`/`{prompt}` and `{label}` replaced by the seed example's values."""
    values = {"text": input_text(seed_example), "prompt": input_text(seed_example), "label": seed_example.label or ""}
    return re.sub(r"\{(text|prompt|label)\}", lambda match: values[match.group(1)], template)


def first_paragraph(generated: str) -> str:
    """A generation as an example's text: whitespace normalised, up to the first blank line."""
    return normalize_whitespace(generated).split("\n\n", 1)[0].strip()


def seed_indices(train_size: int, settings: SyntheticAugmentation, seed: int) -> list[int]:
    """Which training examples seed the `count` generations (with replacement, seeded)."""
    return [example_rng(seed, "synthetic-seed", i).randrange(train_size) for i in range(settings.count)]


def synthesize(
    train: Sequence[Example], held_out: Sequence[Example], settings: SyntheticAugmentation, seed: int, generate: Generate
) -> tuple[list[Example], SyntheticReport]:
    """Generate `settings.count` examples from training seeds; keep those of the right length that
    match no real example (train, validation, test) and no earlier kept one."""
    report = SyntheticReport()
    if not train:
        return [], report
    seeds = [train[i] for i in seed_indices(len(train), settings, seed)]
    prompts = [fill_template(settings.prompt_template or "", example) for example in seeds]
    outputs = generate(prompts)
    report.generated = len(outputs)
    seen = {text_key(input_text(e)) for e in [*train, *held_out]}
    kept = []
    for seed_example, output in zip(seeds, outputs):
        text = first_paragraph(output)
        if len(text) < max(1, settings.min_chars):
            report.too_short += 1
        elif settings.max_chars and len(text) > settings.max_chars:
            report.too_long += 1
        elif text_key(text) in seen:
            report.duplicate += 1
        else:
            seen.add(text_key(text))
            kept.append(with_input_text(seed_example, text))
    report.kept = len(kept)
    return kept, report


@dataclasses.dataclass
class ModelGenerator:
    """A causal LM that continues prompts, loaded with the trainer's own model loader."""

    model: Any
    tokenizer: Any
    settings: SyntheticAugmentation
    seed: int
    device: Any

    @classmethod
    def load(cls, model_config: ModelSpec, settings: SyntheticAugmentation, seed: int) -> ModelGenerator:
        import torch

        from kubetune.trainer.training import modeling

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        tokenizer = modeling.load_tokenizer(model_config)
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        model = modeling.load_model(model_config, dtype=dtype).to(device).eval()
        return cls(model=model, tokenizer=tokenizer, settings=settings, seed=seed, device=device)

    def _rendered(self, prompt: str) -> str:
        if not self.settings.chat_template:
            return prompt
        return str(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      tokenize=False, add_generation_prompt=True))

    def __call__(self, prompts: list[str]) -> list[str]:
        import torch

        outputs: list[str] = []
        sampled = self.settings.temperature > 0
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        for start in range(0, len(prompts), GENERATION_BATCH_SIZE):
            batch = [self._rendered(p) for p in prompts[start : start + GENERATION_BATCH_SIZE]]
            encoded = self.tokenizer(batch, return_tensors="pt", padding=True,
                                     add_special_tokens=not self.settings.chat_template).to(self.device)
            # A private RNG stream per batch: reproducible, and the trainer's own seeding is untouched.
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(example_rng(self.seed, "synthetic-sample", start).randrange(2**63))
                generated = self.model.generate(
                    **encoded,
                    max_new_tokens=self.settings.max_new_tokens,
                    do_sample=sampled,
                    temperature=self.settings.temperature if sampled else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]  # (batch, new tokens)
            outputs += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs

    def close(self) -> None:
        """Free the generator's memory before the training model loads."""
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generator_model(dataset: DatasetSpec, base_model: ModelSpec) -> ModelSpec:
    """The model that writes synthetic examples: `synthetic.model`, else the base model."""
    source = dataset.augmentation.synthetic.model
    return ModelSpec(source=source) if source else base_model


# --- The whole augmentation of the training split ---------------------------------------------


@dataclasses.dataclass
class AugmentationReport:
    """What augmentation added, for metrics.json (`data.augmentation`)."""

    real_examples: int
    operations: list[str] = dataclasses.field(default_factory=list)
    rate: float = 0.0
    multiplier: int = 0
    added: int = 0
    dropped_matching_held_out: int = 0
    by_operation: dict[str, int] = dataclasses.field(default_factory=dict)
    synthetic: SyntheticReport | None = None
    synthetic_skipped: str | None = None

    def to_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "realExamples": self.real_examples,
            "operations": self.operations,
            "rate": self.rate,
            "multiplier": self.multiplier,
            "added": self.added,
            "byOperation": self.by_operation,
            "droppedMatchingHeldOut": self.dropped_matching_held_out,
            "synthetic": self.synthetic.to_report() if self.synthetic else None,
        }
        if self.synthetic_skipped:
            report["syntheticSkipped"] = self.synthetic_skipped
        return report


def augment_training_split(
    splits: Splits, dataset: DatasetSpec, generate: Generate | None, generator_name: str = ""
) -> tuple[list[Example], AugmentationReport]:
    """The training split followed by its edited copies and synthetic examples.

    `generate` writes the synthetic examples; None skips them (validate-only runs load no
    weights). Validation and test are read only to drop what would copy them.
    """
    settings = dataset.augmentation
    real = list(splits.train)
    held_out = [*splits.validation, *splits.test]
    held_out_keys = {text_key(input_text(e)) for e in held_out}
    report = AugmentationReport(real_examples=len(real))
    added: list[Example] = []
    if settings.enabled:
        report.operations, report.rate, report.multiplier = list(settings.operations), settings.rate, settings.multiplier
        for _, operation, copy in edited_copies(real, settings):
            if text_key(input_text(copy)) in held_out_keys:
                report.dropped_matching_held_out += 1
                continue
            added.append(copy)
            report.by_operation[operation] = report.by_operation.get(operation, 0) + 1
        report.added = len(added)
    if settings.synthetic.enabled:
        if generate is None:
            report.synthetic_skipped = "validate-only: no generator model is loaded"
        else:
            synthetic, report.synthetic = synthesize(real, held_out, settings.synthetic, settings.seed, generate)
            report.synthetic.model = generator_name
            added += synthetic
    log.info("augmentation: %d real training examples, %d added", len(real), len(added))
    return real + added, report
