"""Every message the trainer can send is accepted by the operator, and means the same on both sides.

Messages are generated with hypothesis from the shared definitions (kubetune.api.messages): the
trainer's own Reporter and termination_summary turn them into bytes, and the operator's own
parser and status merge read them back. A field added to the contract is generated here at once.
"""

from __future__ import annotations

import io
import json
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api import config as trainer_config, finetunejob as models, messages
from kubetune.operator.jobs import reconcile
from kubetune.operator.progress import reports
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer import reporting

JOB = trainer_config.JobIdentity(namespace="team-a", name="tune", uid="u-1")
MAX_BYTES = OperatorSettings().max_report_bytes

NAMES = st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=12)
"""Label and metric names (the trainer's are words)."""


def strategy(kind: Any) -> st.SearchStrategy[Any]:
    """Values of a contract type: floats are finite JSON numbers, ints counts, TypedDicts objects
    with their required keys and any subset of their optional ones."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is float:
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 10**6)
    if kind is int:
        return st.integers(0, 2**40)
    if kind is str:
        return st.text(max_size=40)
    if kind is Any:
        return st.integers(0, 100)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(strategy(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(NAMES, strategy(args[1]), max_size=3)
    if typing.is_typeddict(kind):
        hints = typing.get_type_hints(kind)
        required = {k: strategy(hints[k]) for k in sorted(kind.__required_keys__)}
        optional = {k: strategy(hints[k]) for k in sorted(kind.__optional_keys__)}
        values = st.fixed_dictionaries(required, optional=optional)
        if kind in (messages.TestMetrics, messages.TestResults):  # open: further metric names with numbers
            extra = st.dictionaries(NAMES.map(lambda n: f"val{n}"), strategy(float), max_size=2)
            values = st.builds(lambda known, more: {**more, **known}, values, extra)
        return values
    raise TypeError(f"no strategy for {kind!r}: add one for the new contract type")


def with_nones(values: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """The trainer leaves a figure it does not have as None (e.g. no test split: loss None)."""
    return st.builds(lambda v, holes: {**v, **{k: None for k in holes}}, values,
                     st.sets(st.sampled_from(sorted(typing.get_type_hints(messages.TestMetrics))), max_size=2))


REPORT_FIELDS = strategy(messages.ReportFields)


def send(kind: str, fields: dict[str, Any]) -> bytes:
    """The bytes the trainer's Reporter prints (and POSTs) for one report."""
    stream = io.StringIO()
    reporting.Reporter(JOB, stream=stream).report(kind, **fields)
    return stream.getvalue().strip().encode()


class TestProgressReports:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kind=st.sampled_from(messages.KINDS), fields=REPORT_FIELDS)
    def test_every_report_the_trainer_sends_is_accepted_and_merged(self, kind: str, fields: dict[str, Any]) -> None:
        report = reports.parse_report(send(kind, fields), MAX_BYTES)

        patch = reports.merge_report({}, report, recent_checkpoints=5)
        assert report.kind == kind and report.job == reports.JobKey("team-a", "tune", "u-1")
        if "results" in fields:
            assert patch["results"] == fields["results"]
        if "samples" in fields:
            assert patch["samples"] == fields["samples"]
        if fields.get("resolved"):
            assert patch["resolved"] == fields["resolved"]
        if "tracking" in fields:
            assert patch["tracking"] == fields["tracking"]
        for name in messages.number_fields(messages.ReportFields) + messages.count_fields(messages.ReportFields):
            if name in fields:
                assert report.body[name] == fields[name]

    @settings(max_examples=100, deadline=None)
    @given(results=with_nones(strategy(messages.TestResults)))
    def test_a_completed_report_with_figures_left_as_none_is_accepted(self, results: dict[str, Any]) -> None:
        report = reports.parse_report(send("completed", {"results": results}), MAX_BYTES)

        patch = reports.merge_report({}, report, recent_checkpoints=5)
        assert patch["results"] == {k: v for k, v in results.items() if v is not None}

    def test_a_classification_completed_report_keeps_its_valloss_model_and_per_class_results(self) -> None:
        from kubetune.trainer.evaluation import evaluate

        tuned = evaluate.classification_metrics(["bug", "bug", "other"], ["bug", "other", "other"], ["bug", "other"])
        base = evaluate.classification_metrics(["bug", "bug", "other"], ["other", "other", "other"], ["bug", "other"])
        results = {"loss": 0.7, "perplexity": 2.01, "tokenAccuracy": 0.5, "examples": 3, **tuned,
                   "baseline": {"loss": 1.2, **base}, "improvement": evaluate.improvement(base, tuned)}

        report = reports.parse_report(send("completed", {"valLoss": 0.61, "results": results,
                                                         "model": {"uri": "/mnt/pvc/models/tune/model",
                                                                   "digest": "sha256:ab"}}), MAX_BYTES)

        patch = reports.merge_report({}, report, recent_checkpoints=5)
        assert patch["metrics"]["valLoss"] == 0.61
        assert patch["model"] == {"uri": "pvc://models/tune/model", "digest": "sha256:ab"}
        assert patch["results"]["perClass"]["bug"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                                       "support": 2}
        assert patch["results"]["confusionMatrix"] == {"labels": ["bug", "other"], "matrix": [[1, 1], [0, 1]]}

    def test_a_field_outside_the_contract_is_refused_by_the_trainer_before_it_is_sent(self) -> None:
        with pytest.raises(ValueError, match="valLos"):
            reporting.Reporter(JOB, stream=io.StringIO()).report("progress", valLos=1.0)
        with pytest.raises(ValueError, match="finished"):
            reporting.Reporter(JOB, stream=io.StringIO()).report("finished")


def _pod_ended_with(message: str) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "exitCode": 0, "message": message, "finishedAt": "2026-03-01T12:00:00Z"}}}]}}


class TestTerminationSummary:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(summary=strategy(messages.TerminationSummary))
    def test_every_summary_fits_the_termination_message_and_the_operator_reads_it(self, summary: dict[str, Any]) -> None:
        text = reporting.termination_summary(
            summary["outcome"], step=summary.get("step"), val_loss=summary.get("valLoss"),
            results=summary.get("results"), model_digest=summary.get("modelDigest"),
            message=summary.get("message", ""), samples=summary.get("samples"), resolved=summary.get("resolved"),
            tracking=summary.get("tracking"))

        assert len(text.encode()) <= messages.TERMINATION_MESSAGE_LIMIT
        ended = reconcile.latest_termination((_pod_ended_with(text),), "trainer")
        assert ended is not None and ended.summary["outcome"] == summary["outcome"]
        for name in ("step", "valLoss", "modelDigest"):
            assert ended.summary.get(name) == summary.get(name)
        if summary.get("resolved"):
            assert reports.resolved_hyperparameters(ended.summary.get("resolved")) == summary["resolved"]
        if summary.get("tracking"):
            assert reports.tracking_status(ended.summary.get("tracking")) == summary["tracking"]

    def test_an_unavailable_tracking_server_reaches_the_status_from_the_summary_and_the_report(self) -> None:
        tracking = {"state": "unavailable", "message": "MLflow tracking server http://mlflow:5000 unavailable: "
                                                       "Connection refused; training goes on without tracking"}

        text = reporting.termination_summary("succeeded", step=3, message="x" * 5000, tracking=tracking)
        report = reports.parse_report(send("completed", {"step": 3, "tracking": tracking}), MAX_BYTES)

        assert len(text.encode()) <= messages.TERMINATION_MESSAGE_LIMIT
        assert reports.tracking_status(json.loads(text)["tracking"]) == tracking
        assert reports.merge_report({}, report, recent_checkpoints=5)["tracking"] == tracking

    def test_the_summary_of_a_run_carries_its_resolved_hyperparameters(self) -> None:
        resolved = {"epochs": 3.0, "batchSize": 8, "learningRate": 0.0002, "scheduler": "cosine", "warmupRatio": 0.03,
                    "weightDecay": 0.0, "dropout": None, "maxSeqLength": 512, "gradientAccumulationSteps": 1,
                    "seed": 42, "automatic": ["batchSize"]}

        text = reporting.termination_summary("succeeded", step=12, resolved=resolved)

        summary = json.loads(text)
        assert reports.resolved_hyperparameters(summary["resolved"]) == {k: v for k, v in resolved.items() if v is not None}


class TestOneDefinition:
    @pytest.mark.parametrize(("shared", "status"), [
        (messages.ResolvedHyperparameters, models.ResolvedHyperparameters),
        (messages.TestMetrics, models.TestMetrics),
        (messages.ClassMetrics, models.ClassMetrics),
        (messages.ConfusionMatrix, models.ConfusionMatrix),
        (messages.Improvement, models.Improvement),
        (messages.TestResults, models.EvaluationResults),
        (messages.SampleAnswer, models.SampleAnswer),
        (messages.ModelRef, models.ModelArtifact),
        (messages.TrackingStatus, models.TrackingStatus),
    ], ids=lambda t: t.__name__)
    def test_the_status_schema_has_exactly_the_fields_the_trainer_sends(self, shared: type, status: type) -> None:
        assert set(typing.get_type_hints(shared)) == set(typing.get_type_hints(status))

    def test_the_operator_checks_the_numbers_and_counts_the_contract_defines(self) -> None:
        assert set(reports.NUMBER_FIELDS) == {"epoch", "trainLoss", "valLoss", "valPerplexity", "learningRate",
                                              "tokensPerSecond", "etaSeconds"}
        assert set(reports.COUNT_FIELDS) == {"step", "totalSteps", "tokensSeen"}
