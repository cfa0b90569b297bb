"""`kubetune status` and `kubetune dev`: the base model and the fine-tuned one side by side, and the
sample answers."""

from __future__ import annotations

from kubetune.cli import main as cli, progress_view

RESULTS = {"loss": 2.0, "perplexity": 7.389, "tokenAccuracy": 0.5, "examples": 4,
           "baseline": {"loss": 3.0, "perplexity": 20.09, "tokenAccuracy": 0.3, "examples": 4},
           "improvement": {"perplexityDrop": 0.632, "lossDrop": 1.0, "tokenAccuracyGain": 20.0}}
SAMPLES = [{"prompt": "How do I pause a job?", "reference": "Set spec.suspend to true.",
            "base": "I am not sure.", "tuned": "Set spec.suspend: true."}]


def test_the_summary_shows_base_and_fine_tuned_side_by_side() -> None:
    text = progress_view.summary({"metadata": {"namespace": "a", "name": "faq"},
                                  "status": {"phase": "Succeeded", "results": RESULTS}})
    lines = text.splitlines()
    table = lines[lines.index("  results on the test split:") + 1:]
    assert table[0].split() == ["metric", "base", "model", "fine-tuned", "change"]
    assert table[1].split() == ["loss", "3.0000", "2.0000", "-1.0000"]
    assert table[2].split() == ["perplexity", "20.0900", "7.3890", "63.2%", "lower"]
    assert table[3].split() == ["tokenAccuracy", "0.3000", "0.5000", "+20.0", "points"]


def test_a_run_that_did_not_help_says_so() -> None:
    results = {"perplexity": 12.0, "baseline": {"perplexity": 10.0}, "improvement": {"perplexityDrop": -0.2}}
    assert progress_view.comparison_rows(results)[1].split() == ["perplexity", "10.0000", "12.0000", "20.0%", "higher"]


def test_sample_answers_are_printed_prompt_by_prompt() -> None:
    view = progress_view.samples_view({"samples": SAMPLES})
    assert view.splitlines() == ["[1] prompt: How do I pause a job?",
                                 "    base model:  I am not sure.",
                                 "    fine-tuned:  Set spec.suspend: true.",
                                 "    reference:   Set spec.suspend to true."]
    assert "spec.evaluation.samples" in progress_view.samples_view({})
    empty = progress_view.samples_view({"samples": [{**SAMPLES[0], "base": ""}]})
    assert "    base model:  (nothing: the model ended its answer at once)" in empty.splitlines()


def test_status_takes_a_samples_flag() -> None:
    args = cli.build_parser().parse_args(["status", "faq", "--samples"])
    assert args.samples is True
    assert cli.build_parser().parse_args(["status", "faq"]).samples is False
