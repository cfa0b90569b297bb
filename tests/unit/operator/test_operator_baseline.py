"""Base model vs fine-tuned: the baseline, the improvement and the sample answers reach status, Events
and Prometheus; malformed ones are refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api import finetunejob as models
from kubetune.operator import metrics as metrics_module
from kubetune.operator.jobs import reconcile
from kubetune.operator.progress import reports
from kubetune.operator.progress.reports import ReportError
from kubetune.operator.settings import OperatorSettings

from .test_operator_reconcile import MakeJob, job_with_conditions, pod, validated_status, with_children
from .test_operator_reports import body, parse

TUNED = {"loss": 2.0, "perplexity": 7.389, "tokenAccuracy": 0.5, "examples": 4}
BASELINE = {"loss": 3.0, "perplexity": 20.09, "tokenAccuracy": 0.3, "examples": 4}
IMPROVEMENT = {"perplexityDrop": 0.632, "lossDrop": 1.0, "tokenAccuracyGain": 20.0}
RESULTS = {**TUNED, "baseline": BASELINE, "improvement": IMPROVEMENT}
SAMPLES = [{"prompt": "How do I pause a job?", "reference": "Set spec.suspend to true.",
            "base": "I am not sure what a job is.", "tuned": "Set spec.suspend: true on the FineTuneJob."},
           {"prompt": "What is a FineTuneJob?", "reference": "A resource.", "base": "A job.", "tuned": "A resource."}]
CLASSIFICATION = {"accuracy": 0.9, "f1": 0.88, "perClass": {"bug": {"precision": 1.0, "recall": 0.8, "f1": 0.89,
                                                                   "support": 5}},
                  "confusionMatrix": {"labels": ["bug", "other"], "matrix": [[4, 1], [0, 5]]}}


class TestReportsCarryTheBaseline:
    def test_a_completed_report_with_baseline_improvement_and_samples_reaches_status(self) -> None:
        patch = reports.merge_report({}, parse(kind="completed", results=RESULTS, samples=SAMPLES),
                                     recent_checkpoints=5)
        assert patch["results"] == RESULTS
        assert patch["samples"] == SAMPLES

    def test_classification_results_with_per_class_details_are_accepted_for_both_models(self) -> None:
        results = {**CLASSIFICATION, "baseline": CLASSIFICATION, "improvement": {"f1Gain": 12.5}}
        assert parse(kind="completed", results=results).body["results"] == results

    @pytest.mark.parametrize(("fields", "problem"), [
        ({"results": {**TUNED, "baseline": {"perplexity": "low"}}},
         'results.baseline.perplexity: must be a number, got "low"'),
        ({"results": {**TUNED, "baseline": [1.0]}}, "results.baseline: must be a mapping"),
        ({"results": {**TUNED, "improvement": {"perplexityDrop": "a lot"}}},
         "results.improvement.perplexityDrop: must be a number"),
        ({"results": {**TUNED, "improvement": {"vibes": 1.0}}}, "results.improvement.vibes: unknown field"),
        ({"results": {**TUNED, "baseline": {"notes": "x"}}}, "results.baseline: must be an object of metric names"),
        ({"results": {"f1": {"nested": 1}}}, "results: must be an object"),
        ({"samples": "the answers"}, "samples: must be a list"),
        ({"samples": [{"prompt": 3}]}, "samples[0].prompt: must be a string"),
        ({"samples": [{"prompt": "x" * 1001}]}, "samples[0].prompt: must have at most 1000 characters"),
        ({"samples": [{"prompt": "q", "tuned": "a"}] * 21}, "samples: must have at most 20 items"),
    ])
    def test_malformed_baselines_and_samples_are_refused_naming_the_field(self, fields: dict[str, Any],
                                                                          problem: str) -> None:
        with pytest.raises(ReportError) as caught:
            reports.parse_report(json.dumps(body(kind="completed", **fields)).encode(), 65536)
        assert caught.value.status == 400
        assert problem in str(caught.value)

    def test_reports_without_samples_leave_status_samples_alone(self) -> None:
        assert "samples" not in reports.merge_report({"samples": SAMPLES}, parse(), recent_checkpoints=5)


class TestSuccess:
    def succeed(self, make_job: MakeJob, settings: OperatorSettings, summary: dict[str, Any],
                **status: Any) -> reconcile.Decision:
        observed = with_children(
            make_job(status={**validated_status(), **status}), settings,
            trainer_job=job_with_conditions("demo-train", ("Complete", "CompletionsReached"), succeeded=1,
                                            completionTime="2026-03-01T11:30:00Z"),
            trainer_pods=(pod("Succeeded", exit_code=0, message=json.dumps(summary)),))
        return reconcile.reconcile(observed, settings)

    def test_the_termination_summary_brings_the_baseline_and_the_comparison(self, make_job: MakeJob,
                                                                            settings: OperatorSettings) -> None:
        summary = {"outcome": "succeeded", "step": 10, "results": RESULTS, "modelDigest": "sha256:1",
                   "message": "trained 10 steps; test perplexity 7.389 vs 20.09 for the base model (63.2% lower)"}
        decision = self.succeed(make_job, settings, summary)
        assert decision.status_patch["results"]["baseline"] == BASELINE
        assert decision.status_patch["results"]["improvement"] == IMPROVEMENT
        succeeded = next(c for c in decision.status_patch["conditions"] if c["type"] == "Succeeded")
        assert "7.389 vs 20.09 for the base model (63.2% lower)" in succeeded["message"]
        models.status_from_dict({k: v for k, v in decision.status_patch.items() if k != "conditions"})

    def test_an_event_shows_the_first_sample_answer_when_the_job_succeeds(self, make_job: MakeJob,
                                                                          settings: OperatorSettings) -> None:
        decision = self.succeed(make_job, settings, {"outcome": "succeeded", "results": TUNED}, samples=SAMPLES)
        (event,) = [e for e in decision.events if e.reason == "SampleAnswers"]
        assert event.type == "Normal"
        assert event.message == ("sample 1 of 2: Q: How do I pause a job? | base: I am not sure what a job is. | "
                                 "tuned: Set spec.suspend: true on the FineTuneJob.")

    def test_without_the_report_the_event_uses_the_summarys_excerpt(self, make_job: MakeJob,
                                                                     settings: OperatorSettings) -> None:
        summary = {"outcome": "succeeded", "results": TUNED, "samples": [{"prompt": "Q?", "tuned": "A.", "base": "B."}]}
        decision = self.succeed(make_job, settings, summary)
        assert [e.message for e in decision.events if e.reason == "SampleAnswers"] == ["Q: Q? | base: B. | tuned: A."]
        assert "samples" not in decision.status_patch  # status.samples comes from the full report only

    def test_the_event_is_posted_once_not_on_every_later_pass(self, make_job: MakeJob,
                                                              settings: OperatorSettings) -> None:
        first = self.succeed(make_job, settings, {"outcome": "succeeded"}, samples=SAMPLES)
        later = self.succeed(make_job, settings, {"outcome": "succeeded"}, samples=SAMPLES,
                             conditions=first.status_patch["conditions"])
        assert [e.reason for e in later.events if e.reason == "SampleAnswers"] == []

    def test_long_answers_are_cut_to_an_event_message(self) -> None:
        text = reconcile.sample_excerpt([{"prompt": "q", "base": "b" * 2000, "tuned": "t"}])
        assert len(text) == 1024 and text.endswith("…")


class TestPrometheus:
    def series(self, registry_text: str, name: str) -> dict[str, float]:
        found = {}
        for line in registry_text.splitlines():
            if line.startswith(name + "{"):
                labels, value = line.rsplit(" ", 1)
                found[labels[len(name):]] = float(value)
        return found

    def test_both_models_test_metrics_and_the_improvement_are_exported(self) -> None:
        metrics = metrics_module.OperatorMetrics()
        metrics.observe_results("team-a", "faq", RESULTS)
        text = metrics.exposition().decode()
        tested = self.series(text, "kubetune_job_test_metric")
        assert tested['{metric="perplexity",model="tuned",name="faq",namespace="team-a"}'] == 7.389
        assert tested['{metric="perplexity",model="base",name="faq",namespace="team-a"}'] == 20.09
        assert len(tested) == 6  # loss, perplexity, tokenAccuracy for each model
        improved = self.series(text, "kubetune_job_improvement")
        assert improved['{metric="perplexityDrop",name="faq",namespace="team-a"}'] == 0.632

    def test_a_completed_report_exports_them_and_deleting_the_job_removes_them(self) -> None:
        metrics = metrics_module.OperatorMetrics()
        metrics.observe_report("team-a", "faq", 0, {"kind": "completed", "results": RESULTS})
        assert self.series(metrics.exposition().decode(), "kubetune_job_improvement")
        metrics.forget_job("team-a", "faq")
        text = metrics.exposition().decode()
        assert not self.series(text, "kubetune_job_test_metric") and not self.series(text, "kubetune_job_improvement")

    def test_results_without_a_baseline_export_the_tuned_model_only(self) -> None:
        metrics = metrics_module.OperatorMetrics()
        metrics.observe_results("team-a", "faq", {"perplexity": 3.0, "notes": "x"})
        assert list(self.series(metrics.exposition().decode(), "kubetune_job_test_metric")) == [
            '{metric="perplexity",model="tuned",name="faq",namespace="team-a"}']


class TestSpec:
    def test_baseline_is_on_and_samples_off_by_default(self) -> None:
        evaluation = models.EvaluationSpec()
        assert (evaluation.baseline, evaluation.samples) == (True, 0)

    @pytest.mark.parametrize("samples", [-1, 21])
    def test_samples_out_of_range_are_refused_naming_the_field(self, samples: int) -> None:
        from kubetune.api import schema as apischema

        with pytest.raises(apischema.ValidationError) as caught:
            apischema.parse(models.EvaluationSpec, {"samples": samples}, "spec.evaluation")
        assert "spec.evaluation.samples" in str(caught.value)
