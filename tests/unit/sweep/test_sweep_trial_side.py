"""What a trial (a FineTuneJob) keeps and does for its sweep: the whole learning curve in status, and
ending as Pruned when the sweep prunes it."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed
from kubetune.operator.progress import reports
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.sweeps import reconcile as sweep

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(trainer_image="trainer:test", progress_url="http://operator:8080/v1/reports",
                            secret_key=b"test-key")
JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "lr-t2", "namespace": "team", "uid": "uid-t2", "generation": 1, "annotations": {}},
    "spec": {"model": {"source": "pvc://models/base/gpt2"},
             "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
             "output": {"storage": "pvc://models/finetunes"}},
    "status": {"conditions": [{"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "",
                               "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"},
                              {"type": "Running", "status": "True", "reason": "Training", "message": "",
                               "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"}],
               "metrics": {"valLoss": 2.1}},
}


def evaluation(step: int, seq: int, **figures: float) -> reports.Report:
    body = {"job": {"namespace": "team", "name": "lr-t2", "uid": "uid-t2"}, "attempt": 0, "seq": seq,
            "time": "2026-03-01T12:00:00Z", "kind": "evaluation", "step": step, "totalSteps": 100,
            "valLoss": figures.pop("valLoss", 2.0), "results": figures}
    return reports.parse_report(json.dumps(body).encode(), 65536)


class TestTheLearningCurveInStatus:
    def test_every_evaluation_is_kept_not_only_the_recent_checkpoints(self) -> None:
        status: dict[str, Any] = {}
        for seq, step in enumerate(range(10, 130, 10), start=1):
            status |= reports.merge_report(status, evaluation(step, seq, valLoss=3.0 - step / 100),
                                           recent_checkpoints=5)
        curve = status["metrics"]["evaluations"]
        assert [p["step"] for p in curve] == list(range(10, 130, 10))
        assert curve[0] == {"step": 10, "valLoss": 2.9}

    def test_classification_figures_are_in_each_point_and_the_latest_in_metrics(self) -> None:
        status = reports.merge_report({}, evaluation(20, 1, valLoss=1.5, valTokenAccuracy=0.4, valAccuracy=0.75,
                                                     valF1=0.7), recent_checkpoints=5)
        assert status["metrics"]["evaluations"] == [
            {"step": 20, "valLoss": 1.5, "valTokenAccuracy": 0.4, "valAccuracy": 0.75, "valF1": 0.7}]
        assert status["metrics"]["valAccuracy"] == 0.75 and status["metrics"]["valF1"] == 0.7

    def test_a_resumed_attempt_re_evaluating_a_step_replaces_that_point(self) -> None:
        status = reports.merge_report({}, evaluation(20, 1, valLoss=1.5), recent_checkpoints=5)
        status |= reports.merge_report(status, evaluation(20, 2, valLoss=1.4), recent_checkpoints=5)
        assert status["metrics"]["evaluations"] == [{"step": 20, "valLoss": 1.4}]

    def test_the_curve_is_bounded_to_the_newest_points(self) -> None:
        curve = [{"step": s, "valLoss": 1.0} for s in range(reports.MAX_EVALUATIONS)]
        status = reports.merge_report({"metrics": {"evaluations": curve}}, evaluation(10_000, 1),
                                      recent_checkpoints=5)
        kept = status["metrics"]["evaluations"]
        assert len(kept) == reports.MAX_EVALUATIONS and kept[0]["step"] == 1 and kept[-1]["step"] == 10_000

    def test_progress_reports_leave_the_curve_alone(self) -> None:
        status = reports.merge_report({}, evaluation(20, 1), recent_checkpoints=5)
        body = {"job": {"namespace": "team", "name": "lr-t2", "uid": "uid-t2"}, "attempt": 0, "seq": 2,
                "time": "2026-03-01T12:00:01Z", "kind": "progress", "step": 21, "valLoss": 9.0}
        status |= reports.merge_report(status, reports.parse_report(json.dumps(body).encode(), 65536),
                                       recent_checkpoints=5)
        assert status["metrics"]["evaluations"] == [{"step": 20, "valLoss": 2.0}]


def observed(job: dict[str, Any], **children: Any) -> Observed:
    rendered = render.trainer_config_for(job)
    return Observed(job=job, now=NOW, config_map=builders.trainer_configmap(job, rendered),
                    progress_secret=builders.progress_secret(job, "t"), **children)


def pruned_job() -> dict[str, Any]:
    job = copy.deepcopy(JOB)
    job["metadata"]["annotations"][sweep.ANNOTATION_PRUNED] = "pruned by sweep (asha) at step 40: valLoss 2.3"
    return job


class TestAPrunedTrialEnds:
    def test_its_trainer_job_is_deleted_and_it_ends_pruned_not_suspended(self) -> None:
        trainer = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "lr-t2-train"},
                   "spec": {"suspend": False}, "status": {"active": 1}}
        decision = reconcile.reconcile(observed(pruned_job(), trainer_job=trainer), SETTINGS)
        assert DeleteChild("batch/v1", "Job", "lr-t2-train") in decision.actions
        assert not [a for a in decision.actions if isinstance(a, CreateChild)]
        found = {c["type"]: c for c in decision.status_patch["conditions"]}
        assert (found["Succeeded"]["status"], found["Succeeded"]["reason"]) == ("False", conditions.PRUNED)
        assert found["Succeeded"]["message"] == "pruned by sweep (asha) at step 40: valLoss 2.3"
        assert (found["Failed"]["status"], found["Failed"]["reason"]) == ("True", conditions.PRUNED)
        assert found["Running"]["status"] == "False" and found["Suspended"]["status"] == "False"
        assert decision.status_patch["phase"] == "Pruned" and decision.status_patch["completionTime"]
        # One Event for the transition, naming each condition it moved (Normal: pruning is no failure).
        (event,) = [e for e in decision.events if e.reason == conditions.PRUNED]
        assert event.type == "Normal" and "Failed=True" in event.message and "Succeeded=False" in event.message

    def test_once_pruned_nothing_is_created_again(self) -> None:
        job = pruned_job()
        first = reconcile.reconcile(observed(job), SETTINGS)
        job["status"] = {**job["status"], **first.status_patch}
        again = reconcile.reconcile(observed(job), SETTINGS)
        assert not [a for a in again.actions if isinstance(a, (CreateChild, DeleteChild))]
        assert again.status_patch["phase"] == "Pruned"

    def test_the_sweep_and_the_finetunejob_operator_use_the_same_annotation(self) -> None:
        assert sweep.ANNOTATION_PRUNED == reconcile.ANNOTATION_PRUNED == "kubetune.io/pruned-by-sweep"
