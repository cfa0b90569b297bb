"""Did fine-tuning help? The base model on the same test split, the improvement, and sample answers
before and after training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import config as cfg, process as api_process
from kubetune.trainer import reporting
from kubetune.trainer.__main__ import BASELINE_FILE, main
from kubetune.trainer.evaluation import evaluate, outputs, samples
from kubetune.trainer.prep import data

from .trainer_runs import classification_records, config, text_records, write_config, write_jsonl

NO_CHANGE_TOLERANCE = 1e-3
"""|perplexityDrop| below this (0.1%) reads as "it did not help"; at learning rate 1e-9 the weights
move by about 1e-9 per step, so the measured drop is float noise, orders of magnitude smaller."""


class TestImprovement:
    def test_relative_perplexity_drop_loss_drop_and_gains_in_points(self) -> None:
        found = evaluate.improvement({"loss": 3.0, "perplexity": 20.0, "tokenAccuracy": 0.3, "accuracy": 0.5, "f1": 0.4},
                                     {"loss": 2.0, "perplexity": 5.0, "tokenAccuracy": 0.45, "accuracy": 0.75, "f1": 0.7})
        assert found == pytest.approx({"perplexityDrop": 0.75, "lossDrop": 1.0, "tokenAccuracyGain": 15.0,
                                       "accuracyGain": 25.0, "f1Gain": 30.0})

    def test_the_same_figures_mean_no_improvement_and_worse_ones_a_negative_one(self) -> None:
        same = {"loss": 2.0, "perplexity": 7.4, "f1": 0.5}
        assert evaluate.improvement(same, same) == {"perplexityDrop": 0.0, "lossDrop": 0.0, "f1Gain": 0.0}
        worse = evaluate.improvement({"perplexity": 10.0}, {"perplexity": 12.0})
        assert worse["perplexityDrop"] == pytest.approx(-0.2)

    def test_metrics_missing_on_either_side_are_left_out(self) -> None:
        assert evaluate.improvement({"perplexity": 10.0}, {"f1": 0.5}) == {}


class TestSamplePrompts:
    def test_chat_prompts_are_the_conversation_up_to_the_first_answer_as_training_renders_it(
            self, tiny_gpt2: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)  # its own copy: the template is set here
        tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
        example = data.Example(messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "How do I pause a job?"},
                                         {"role": "assistant", "content": "Set spec.suspend."}])
        prompt = samples.sample_prompt(example, tokenizer)
        assert prompt is not None
        assert (prompt.prompt, prompt.reference) == ("How do I pause a job?", "Set spec.suspend.")
        trained = data.tokenize_example(example, tokenizer, append_eos=False)
        # The prompt is exactly the part of the training tokens the loss does not cover.
        assert prompt.input_ids == trained.input_ids[: trained.loss_mask.index(True)]

    def test_prompt_completion_and_classification_prompts_match_training(self, tiny_tokenizer: Any) -> None:
        pair = data.Example(prompt="Question: why?", completion=" Because.")
        prompt = samples.sample_prompt(pair, tiny_tokenizer)
        assert prompt is not None and prompt.reference == " Because."
        trained = data.tokenize_example(pair, tiny_tokenizer, append_eos=True)
        assert prompt.input_ids == trained.input_ids[: trained.loss_mask.index(True)]
        labelled = data.Example(prompt="The job was slow.", completion=data.classification_completion("negative"),
                                label="negative")
        prompt = samples.sample_prompt(labelled, tiny_tokenizer)
        assert prompt is not None and (prompt.prompt, prompt.reference) == ("The job was slow.", "negative")
        assert tiny_tokenizer.decode(prompt.input_ids).endswith("Label:")

    def test_plain_text_is_cut_in_half_at_most_32_words_of_prompt(self, tiny_tokenizer: Any) -> None:
        words = [f"w{i}" for i in range(100)]
        prompt = samples.sample_prompt(data.Example(completion=" ".join(words)), tiny_tokenizer)
        assert prompt is not None
        assert prompt.prompt == " ".join(words[:32]) and prompt.reference == " ".join(words[32:])
        assert samples.sample_prompt(data.Example(completion="one"), tiny_tokenizer) is None

    def test_the_first_n_usable_test_examples_are_taken(self, tiny_tokenizer: Any) -> None:
        examples = [data.Example(completion="x")] + [data.Example(prompt=f"p{i}", completion="c") for i in range(5)]
        assert [p.prompt for p in samples.sample_prompts(examples, tiny_tokenizer, 3)] == ["p0", "p1", "p2"]

    def test_records_are_bounded_and_the_excerpt_is_one_line(self) -> None:
        prompt = samples.SamplePrompt(prompt="q", reference="r", input_ids=[1])
        (record,) = samples.records([prompt], ["b\n" * 900], ["t"])
        assert len(record["base"]) == samples.STORED_CHARS and record["base"].endswith("…")
        assert samples.excerpt([record]).startswith("Q: q | base: b b b")
        assert "\n" not in samples.excerpt([record])


class TestSummaryAndCard:
    RESULTS = {"loss": 2.0, "perplexity": 7.39, "tokenAccuracy": 0.5, "examples": 4,
               "baseline": {"loss": 3.0, "perplexity": 20.1, "tokenAccuracy": 0.3, "examples": 4},
               "improvement": {"perplexityDrop": 0.632, "lossDrop": 1.0, "tokenAccuracyGain": 20.0}}

    def test_the_termination_summary_keeps_both_models_headline_figures_under_4_kib(self) -> None:
        per_class = {f"label-{i}": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10} for i in range(40)}
        results = {**self.RESULTS, "perClass": per_class,
                   "baseline": {**self.RESULTS["baseline"], "perClass": per_class}}
        sample = {"prompt": "q" * 500, "base": "b" * 500, "tuned": "t" * 500, "reference": "r" * 500}
        text = reporting.termination_summary("succeeded", results=results, samples=[sample, sample])
        assert len(text.encode()) <= reporting.TERMINATION_MESSAGE_LIMIT
        summary = json.loads(text)
        assert summary["results"]["baseline"]["perplexity"] == 20.1
        assert summary["results"]["improvement"]["perplexityDrop"] == 0.632
        assert "perClass" not in summary["results"]["baseline"]
        assert len(summary["samples"]) == 1 and len(summary["samples"][0]["base"]) == 160

    def test_the_model_card_puts_base_and_fine_tuned_side_by_side(self) -> None:
        table = outputs.comparison_table(self.RESULTS)
        assert table[0] == "| test metric | base model | fine-tuned | change |"
        assert "| perplexity | 20.1 | 7.39 | 63.2% lower |" in table
        assert "| tokenAccuracy | 0.3 | 0.5 | +20.0 points |" in table


def _run(tmp_path: Path, content: dict[str, Any]) -> dict[str, Any]:
    assert main(["--config", str(write_config(tmp_path / "config.json", content))]) == api_process.EXIT_OK
    return dict(json.loads((Path(content["output"]["dir"]) / "metrics.json").read_text()))


@pytest.mark.slow
class TestBaselineRuns:
    def test_a_run_that_trains_beats_the_base_model_on_the_same_test_split(
            self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records())
        out = tmp_path / "out"

        metrics = _run(tmp_path, config(tiny_gpt2, train, out))

        results = metrics["results"]
        baseline = results["baseline"]
        assert baseline["examples"] == results["examples"] > 0
        assert baseline["perplexity"] > results["perplexity"]
        assert results["improvement"]["perplexityDrop"] > 0.2
        assert results["improvement"]["lossDrop"] > 0
        # The same pass as the step-0 validation, on the test split instead: the same untrained model.
        assert baseline["loss"] == pytest.approx(metrics["initialValLoss"], rel=0.2)
        assert metrics["baselineSeconds"] > 0
        assert json.loads((out / BASELINE_FILE).read_text())["results"] == baseline
        assert "| perplexity |" in (out / "README.md").read_text()
        summary = json.loads(termination_log.read_text())
        assert summary["results"]["baseline"]["perplexity"] == baseline["perplexity"]
        assert "for the base model" in summary["message"] and "% lower" in summary["message"]

    def test_a_learning_rate_of_1e_9_shows_no_improvement(self, tmp_path: Path, tiny_gpt2: Path,
                                                          termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records())

        metrics = _run(tmp_path, config(tiny_gpt2, train, tmp_path / "out", hyperparameters={"learningRate": 1e-9}))

        improvement = metrics["results"]["improvement"]
        assert abs(improvement["perplexityDrop"]) < NO_CHANGE_TOLERANCE
        assert abs(improvement["tokenAccuracyGain"]) < 0.1  # points
        assert "(0.0% lower)" in json.loads(termination_log.read_text())["message"]

    def test_classification_compares_accuracy_and_f1_and_answers_sample_prompts(
            self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", classification_records())
        out = tmp_path / "out"
        content = config(tiny_gpt2, train, out, dataset={"format": "classification", "split": {"test": 0.2}},
                         hyperparameters={"epochs": 3}, evaluation={"samples": 2})

        metrics = _run(tmp_path, content)

        results = metrics["results"]
        assert {"accuracy", "f1", "perClass", "confusionMatrix"} <= set(results["baseline"])
        assert results["improvement"]["f1Gain"] == pytest.approx((results["f1"] - results["baseline"]["f1"]) * 100)
        stored = json.loads((out / "samples.json").read_text())["samples"]
        assert stored == metrics["samples"] and len(stored) == 2
        assert metrics["baseSampleSeconds"] > 0 and metrics["baselineSeconds"] > 0
        assert all(s["reference"] in ("positive", "negative") and {"base", "tuned"} <= set(s) for s in stored)
        assert "## Sample answers" in (out / "README.md").read_text()
        assert json.loads(termination_log.read_text())["samples"][0]["prompt"] == stored[0]["prompt"]

    def test_baseline_false_skips_the_pass(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records(120))
        out = tmp_path / "out"

        metrics = _run(tmp_path, config(tiny_gpt2, train, out, evaluation={"baseline": False}))

        assert "baseline" not in metrics["results"] and "improvement" not in metrics["results"]
        assert metrics["baselineSeconds"] is None and not (out / BASELINE_FILE).exists()

    def test_a_resumed_run_reuses_the_baseline_measured_before_its_first_step(
            self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records(120))
        out = tmp_path / "out"
        content = config(tiny_gpt2, train, out, evaluation={"samples": 1}, training={"checkpointInterval": 2})
        first = _run(tmp_path, content)
        recorded = json.loads((out / BASELINE_FILE).read_text())
        recorded["results"]["perplexity"] = 12345.0  # a marker: only the recorded baseline can carry it
        (out / BASELINE_FILE).write_text(json.dumps(recorded))

        again = _run(tmp_path, content)  # resumes from the last checkpoint: the model is already trained

        assert again["resumedFrom"] is not None
        assert again["results"]["baseline"]["perplexity"] == 12345.0
        assert again["samples"][0]["base"] == first["samples"][0]["base"]

    def test_samples_must_be_between_0_and_20(self, tmp_path: Path) -> None:
        with pytest.raises(cfg.ConfigError) as caught:
            cfg.config_from_dict({"model": {"source": "m"}, "dataset": {"train": {"source": "t"}},
                                  "output": {"dir": "o"}, "evaluation": {"samples": 21, "baseline": "yes"}})
        assert "evaluation.samples: must be from 0 to 20, got 21" in caught.value.problems
        assert 'evaluation.baseline: must be true or false, got "yes"' in caught.value.problems
