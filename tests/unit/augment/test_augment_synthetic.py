"""Synthetic examples: templates, filters and dedupe, target side copied, seeded generation on a real tiny model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kubetune.api.finetunejob import ModelSpec as ModelConfig, SyntheticAugmentation
from kubetune.trainer.prep import augment
from kubetune.trainer.prep.data import Example, classification_completion


def labelled(text: str, label: str) -> Example:
    return Example(prompt=text, completion=classification_completion(label), label=label)


TRAIN = [labelled("the job was fast", "positive"), labelled("the job was slow", "negative")]
HELD_OUT = [labelled("the job was stuck", "negative")]


def scripted(outputs: list[str]) -> augment.Generate:
    """A generator that answers with `outputs` in order and records the prompts it was given."""

    def generate(prompts: list[str]) -> list[str]:
        generate.prompts = list(prompts)  # type: ignore[attr-defined]
        assert len(prompts) == len(outputs)
        return list(outputs)

    return generate


class TestTemplates:
    def test_placeholders_take_the_seed_examples_text_and_label(self) -> None:
        filled = augment.fill_template("Write a {label} review like '{text}' ({prompt}) {other}", TRAIN[0])
        assert filled == "Write a positive review like 'the job was fast' (the job was fast) {other}"

    def test_the_input_side_of_each_format(self) -> None:
        chat = Example(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}])
        assert [augment.input_text(e) for e in
                (Example(completion="plain"), Example(prompt="q", completion="a"), TRAIN[0], chat)] == \
            ["plain", "q", "the job was fast", "hi"]


class TestFiltersAndDedupe:
    SETTINGS = SyntheticAugmentation(enabled=True, prompt_template="{text}", count=7, min_chars=10, max_chars=30)

    def test_each_drop_reason_is_counted(self) -> None:
        outputs = [
            "a brand new example",            # kept
            "short",                          # too short
            "x" * 31,                         # too long
            "the job  was\tfast",             # equals a training text after whitespace normalisation
            "the job was stuck",              # equals a held-out text
            "a brand new   example",          # equals an earlier kept one
            "second new one\n\nignored tail",  # kept: cut at the first blank line
        ]
        kept, report = augment.synthesize(TRAIN, HELD_OUT, self.SETTINGS, 1, scripted(outputs))
        assert report.to_report() == {"model": "", "generated": 7, "kept": 2, "droppedTooShort": 1,
                                      "droppedTooLong": 1, "droppedDuplicate": 3}
        assert [e.prompt for e in kept] == ["a brand new example", "second new one"]

    def test_kept_examples_copy_the_seed_label(self) -> None:
        generate = scripted([f"generated example number {i}" for i in range(7)])
        kept, _ = augment.synthesize(TRAIN, HELD_OUT, self.SETTINGS, 3, generate)
        seeds = [TRAIN[i] for i in augment.seed_indices(len(TRAIN), self.SETTINGS, 3)]
        assert [(e.label, e.completion) for e in kept] == [(s.label, s.completion) for s in seeds]
        assert generate.prompts == [s.prompt for s in seeds]  # type: ignore[attr-defined]

    def test_seeds_come_from_the_training_split_only(self) -> None:
        settings = SyntheticAugmentation(enabled=True, prompt_template="{text}", count=50)
        generate = scripted(["x"] * 50)
        augment.synthesize(TRAIN, HELD_OUT, settings, 0, generate)
        assert set(generate.prompts) == {e.prompt for e in TRAIN}  # type: ignore[attr-defined]

    def test_prompt_completion_and_chat_keep_their_targets(self) -> None:
        settings = SyntheticAugmentation(enabled=True, prompt_template="Rephrase: {prompt}", count=1, min_chars=1)
        pair = Example(prompt="how do I resume?", completion="rerun the job")
        (kept,), _ = augment.synthesize([pair], [], settings, 0, scripted(["how can a job be resumed?"]))
        assert (kept.prompt, kept.completion) == ("how can a job be resumed?", "rerun the job")
        chat = Example(messages=[{"role": "user", "content": "status?"}, {"role": "assistant", "content": "running"}])
        (kept,), _ = augment.synthesize([chat], [], settings, 0, scripted(["what is the status?"]))
        assert kept.messages == [{"role": "user", "content": "what is the status?"},
                                 {"role": "assistant", "content": "running"}]


@pytest.mark.slow
class TestGenerationWithATinyModel:
    """The tiny model writes gibberish, but counts, filters and determinism are real."""

    def generator(self, model: Path, **settings: object) -> augment.ModelGenerator:
        values: dict[str, object] = {"count": 6, "max_new_tokens": 12, "min_chars": 1, **settings}
        synthetic = SyntheticAugmentation(enabled=True, prompt_template="Another {label} review: {text}",
                                          **values)  # type: ignore[arg-type]
        return augment.ModelGenerator.load(ModelConfig(source=str(model)), synthetic, seed=11)

    def run(self, generator: augment.ModelGenerator) -> tuple[list[Example], augment.SyntheticReport]:
        return augment.synthesize(TRAIN, HELD_OUT, generator.settings, generator.seed, generator)

    def test_greedy_decoding_is_deterministic(self, tiny_generator: Path) -> None:
        generator = self.generator(tiny_generator, temperature=0.0)
        first, report = self.run(generator)
        assert self.run(generator)[0] == first
        assert report.generated == 6 and report.kept + report.too_short + report.too_long + report.duplicate == 6
        # Greedy: the same prompt gives the same text, so repeated seeds are dropped as duplicates.
        seeds = augment.seed_indices(len(TRAIN), generator.settings, generator.seed)
        assert report.kept <= len(set(seeds))

    def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds(self, tiny_generator: Path) -> None:
        generator = self.generator(tiny_generator, temperature=1.0)
        prompts = ["Another positive review: the job was fast"] * 8
        first = generator(prompts)
        assert generator(prompts) == first
        assert len(set(first)) > 1, "sampling gives different texts for the same prompt"
        generator.seed = 12
        assert generator(prompts) != first

    def test_generation_length_is_bounded_by_max_new_tokens(self, tiny_generator: Path) -> None:
        generator = self.generator(tiny_generator, temperature=1.0, max_new_tokens=3)
        short = generator(["the job was fast"] * 4)
        generator.settings = dataclasses.replace(generator.settings, max_new_tokens=24)
        longer = generator(["the job was fast"] * 4)
        # Random weights emit stray byte tokens, so re-tokenising the text says little: bound the characters.
        longest_token = max(len(generator.tokenizer.decode([i])) for i in range(len(generator.tokenizer)))
        assert all(len(text) <= 3 * longest_token for text in short)
        assert sum(map(len, longer)) > 2 * sum(map(len, short))

    def test_chat_template_wraps_the_prompt_as_a_user_turn(self, tiny_generator: Path) -> None:
        generator = self.generator(tiny_generator, temperature=0.0, chat_template=True)
        assert generator._rendered("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert len(generator(["hi"])) == 1

    def test_the_trainers_random_state_is_untouched(self, tiny_generator: Path) -> None:
        import torch

        generator = self.generator(tiny_generator, temperature=1.0)
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        generator(["the job was fast"])
        assert torch.equal(torch.rand(3), expected)

    def test_a_missing_generator_model_is_a_permanent_error(self, tmp_path: Path) -> None:
        from kubetune.trainer.errors import PermanentError

        with pytest.raises(PermanentError, match="no such file"):
            self.generator(tmp_path / "absent")
