"""Experiment tracking (`spec.tracking.mlflow`): what the operator renders into the trainer config, the
tracking server's credentials reaching the trainer pod by reference only, the `tracking` part of the
trainer's reports, and `status.tracking` with the `Tracked` condition."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.api import finetunejob as models
from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.operator import conditions
from kubetune.operator.jobs import builders, reconcile, render
from kubetune.operator.jobs.reconcile import Observed
from kubetune.operator.progress import reports
from kubetune.operator.settings import OperatorSettings


def typed(job: dict[str, Any]) -> FineTuneJobSpec:
    """The job's typed spec, as the reconcile parses it once per pass."""
    return FineTuneJobSpec.from_dict(job["spec"])


NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MakeJob = Callable[..., dict[str, Any]]
URI = "http://mlflow.mlflow:5000"
TRACKING = {"mlflow": {"trackingUri": URI}}
KEY = reports.JobKey("team-a", "demo", "uid-1")


def validated_status(**extra: Any) -> dict[str, Any]:
    return {"conditions": [{"type": "Validated", "status": "True", "reason": "DatasetValid", "message": "",
                            "observedGeneration": 1, "lastTransitionTime": "2026-03-01T10:00:00Z"}], **extra}


def trainer_pod(phase: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if summary is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": 0, "message": json.dumps(summary), "finishedAt": "2026-03-01T11:00:00Z"}}}]
    return {"metadata": {"name": f"p-{phase}", "annotations": {builders.ANNOTATION_ATTEMPT: "0"}}, "status": status}


def observe(job: dict[str, Any], settings: OperatorSettings, *, complete: bool, pods: tuple[dict[str, Any], ...]) -> Observed:
    rendered = render.trainer_config_for(job)
    conds = [{"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": ""}] if complete else []
    tjob = {"metadata": {"name": "demo-train", "annotations": {}}, "spec": {},
            "status": {"conditions": conds, **({"succeeded": 1} if complete else {"active": 1})}}
    return Observed(job=job, now=NOW, config_map=builders.trainer_configmap(job, rendered),
                    progress_secret=builders.progress_secret(job, "t"), trainer_job=tjob, trainer_pods=pods)


def tracked(decision: reconcile.Decision) -> dict[str, Any] | None:
    found = conditions.find(decision.status_patch["conditions"], conditions.TRACKED)
    return dict(found) if found else None


class TestRender:
    def test_the_config_names_the_server_and_defaults_experiment_to_the_namespace_and_run_to_the_job(
            self, make_job: MakeJob) -> None:
        config = render.trainer_config_for(make_job(tracking=TRACKING)).config
        assert config["tracking"] == {"mlflow": {"trackingUri": URI, "experiment": "team-a", "runName": "demo"}}

    def test_explicit_experiment_and_run_name_are_kept(self, make_job: MakeJob) -> None:
        job = make_job(tracking={"mlflow": {"trackingUri": URI, "experiment": "llm", "runName": "try-3"}})
        assert render.trainer_config_for(job).config["tracking"]["mlflow"] == {
            "trackingUri": URI, "experiment": "llm", "runName": "try-3"}

    def test_without_tracking_the_config_has_none(self, make_job: MakeJob) -> None:
        assert "tracking" not in render.trainer_config_for(make_job()).config

    def test_the_trainer_refuses_a_url_with_credentials_as_the_operator_does(self, make_job: MakeJob) -> None:
        job = make_job(tracking={"mlflow": {"trackingUri": "https://ci:hunter2@mlflow.example.com"}})
        with pytest.raises(render.SpecError, match=r"spec\.tracking\.mlflow\.trackingUri: must not carry credentials"):
            render.trainer_config_for(job)

    def test_the_spec_model_reads_the_section_back(self, make_job: MakeJob) -> None:
        spec = models.FineTuneJobSpec.from_dict(make_job(tracking=TRACKING, credentials={
            "mlflow": {"secretName": "mlflow", "usernameKey": "user", "passwordKey": "password"}})["spec"])
        assert spec.tracking is not None and spec.tracking.mlflow is not None
        assert spec.tracking.mlflow.tracking_uri == URI and spec.tracking.mlflow.experiment is None
        assert spec.credentials is not None and spec.credentials.mlflow is not None
        assert spec.credentials.mlflow.password_key == "password"


class TestCredentials:
    def env(self, job: dict[str, Any], settings: OperatorSettings, pod: str = "trainer") -> list[dict[str, Any]]:
        rendered = render.trainer_config_for(job)
        if pod == "trainer":
            built = builders.trainer_job(job, typed(job), rendered, settings)
        else:
            built = builders.validation_job(job, typed(job), rendered, settings)
        return list(built["spec"]["template"]["spec"]["containers"][0]["env"])

    def test_a_token_reaches_the_trainer_by_secret_key_ref_only(self, make_job: MakeJob,
                                                                 settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, credentials={"mlflow": {"secretName": "mlflow-auth", "tokenKey": "tok"}})
        env = {e["name"]: e for e in self.env(job, settings)}
        assert env["MLFLOW_TRACKING_TOKEN"] == {"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "mlflow-auth", "key": "tok", "optional": False}}}
        assert "MLFLOW_TRACKING_USERNAME" not in env and "MLFLOW_TRACKING_PASSWORD" not in env

    def test_user_and_password_reach_it_as_basic_auth_variables(self, make_job: MakeJob,
                                                                settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, credentials={
            "mlflow": {"secretName": "mlflow-auth", "usernameKey": "user", "passwordKey": "pass"}})
        env = {e["name"]: e for e in self.env(job, settings)}
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["key"] == "user"
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "pass"
        assert "MLFLOW_TRACKING_TOKEN" not in env

    def test_no_key_named_means_the_key_token(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, credentials={"mlflow": {"secretName": "mlflow-auth"}})
        env = {e["name"]: e for e in self.env(job, settings)}
        assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-auth", "key": "token", "optional": False}

    def test_no_pod_but_the_trainer_gets_them_and_no_value_is_anywhere(self, make_job: MakeJob,
                                                                       settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, credentials={"mlflow": {"secretName": "mlflow-auth"}})
        assert not [e for e in self.env(job, settings, "validation") if e["name"].startswith("MLFLOW_")]
        trainer = [e for e in self.env(job, settings) if e["name"].startswith("MLFLOW_")]
        assert trainer and all("value" not in e for e in trainer)
        assert "mlflow-auth" not in builders.trainer_configmap(job, render.trainer_config_for(job))["data"][
            render.CONFIG_FILE_NAME]


class TestReports:
    def report(self, **fields: Any) -> reports.Report:
        body = {"job": {"namespace": "team-a", "name": "demo", "uid": "uid-1"}, "attempt": 0, "seq": 1,
                "time": "2026-03-01T11:00:00Z", "kind": "progress", "step": 3, **fields}
        return reports.validate_report(body, KEY)

    def test_the_tracking_state_reaches_the_status(self) -> None:
        tracking = {"state": "ok", "runId": "r1", "experimentId": "1", "url": f"{URI}/#/experiments/1/runs/r1"}
        patch = reports.merge_report({}, self.report(tracking=tracking), recent_checkpoints=3)
        assert patch["tracking"] == tracking

    @pytest.mark.parametrize("bad", [{"state": "maybe"}, {"message": "no state"}, "ok", {"state": "ok", "runId": 7}])
    def test_a_malformed_tracking_state_is_refused(self, bad: Any) -> None:
        with pytest.raises(reports.ReportError, match="tracking"):
            self.report(tracking=bad)


class TestTrackedCondition:
    def test_a_running_trainer_that_logs_makes_tracked_true(self, make_job: MakeJob, settings: OperatorSettings) -> None:
        status = validated_status(tracking={"state": "ok", "runId": "r1", "url": f"{URI}/#/experiments/1/runs/r1"})
        job = make_job(tracking=TRACKING, status=status)
        decision = reconcile.reconcile(observe(job, settings, complete=False, pods=(trainer_pod("Running"),)), settings)
        found = tracked(decision)
        assert found is not None and (found["status"], found["reason"]) == ("True", "TrackingActive")
        assert "r1" in found["message"]

    def test_an_unavailable_server_makes_tracked_false_naming_the_uri(self, make_job: MakeJob,
                                                                      settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, status=validated_status(
            tracking={"state": "unavailable", "message": "Connection refused"}))
        decision = reconcile.reconcile(observe(job, settings, complete=False, pods=(trainer_pod("Running"),)), settings)
        found = tracked(decision)
        assert found is not None and (found["status"], found["reason"]) == ("False", "TrackingUnavailable")
        assert URI in found["message"] and "Connection refused" in found["message"]
        assert condition_running(decision) == "True"  # training goes on
        assert ("Warning", "TrackingUnavailable") in [(e.type, e.reason) for e in decision.events]

    def test_the_termination_summary_finishes_status_tracking_when_the_report_was_lost(
            self, make_job: MakeJob, settings: OperatorSettings) -> None:
        job = make_job(tracking=TRACKING, status=validated_status(tracking={"state": "ok", "runId": "r1"}))
        summary = {"outcome": "succeeded", "step": 10, "tracking": {
            "state": "unavailable", "runId": "r1", "message": f"MLflow tracking server {URI} unavailable: HTTP 503"}}
        decision = reconcile.reconcile(observe(job, settings, complete=True, pods=(trainer_pod("Succeeded", summary),)),
                                       settings)
        assert decision.status_patch["tracking"] == summary["tracking"]
        found = tracked(decision)
        assert found is not None and found["reason"] == "TrackingUnavailable" and "HTTP 503" in found["message"]
        assert conditions.is_true(decision.status_patch["conditions"], conditions.SUCCEEDED)

    def test_without_spec_tracking_there_is_no_tracked_condition(self, make_job: MakeJob,
                                                                 settings: OperatorSettings) -> None:
        job = make_job(status=validated_status(tracking={"state": "ok"}))
        decision = reconcile.reconcile(observe(job, settings, complete=False, pods=(trainer_pod("Running"),)), settings)
        assert tracked(decision) is None


def condition_running(decision: reconcile.Decision) -> str:
    found = conditions.find(decision.status_patch["conditions"], conditions.RUNNING)
    assert found is not None
    return str(found["status"])
