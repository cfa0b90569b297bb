"""Progress reports: a job may only report for itself; malformed, oversized and replayed reports are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.operator.progress import reports
from kubetune.operator.progress.reports import JobKey, ReportError

KEY = b"operator-key"
JOB_A = JobKey("team-a", "alpha", "uid-a")
JOB_B = JobKey("team-a", "beta", "uid-b")


def body(of: JobKey = JOB_A, **fields: Any) -> dict[str, Any]:
    report = {"job": {"namespace": of.namespace, "name": of.name, "uid": of.uid}, "attempt": 0, "seq": 1,
              "time": "2026-03-01T12:00:00Z", "kind": "progress", "step": 10, "totalSteps": 100,
              "trainLoss": 2.5, "tokensSeen": 1000}
    report.update(fields)
    return report


def parse(**fields: Any) -> reports.Report:
    return reports.parse_report(json.dumps(body(**fields)).encode(), 65536)


class TestAuthentication:
    def test_the_jobs_own_token_is_accepted(self) -> None:
        reports.authenticate(KEY, f"Bearer {reports.job_token(KEY, JOB_A)}", JOB_A)

    def test_a_token_for_job_a_is_refused_for_job_b(self) -> None:
        with pytest.raises(ReportError) as caught:
            reports.authenticate(KEY, f"Bearer {reports.job_token(KEY, JOB_A)}", JOB_B)
        assert caught.value.status == 403

    def test_a_recreated_job_with_the_same_name_gets_a_different_token(self) -> None:
        recreated = JobKey(JOB_A.namespace, JOB_A.name, "uid-new")
        assert reports.job_token(KEY, recreated) != reports.job_token(KEY, JOB_A)

    @pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer "])
    def test_missing_tokens_are_refused(self, header: str | None) -> None:
        with pytest.raises(ReportError) as caught:
            reports.authenticate(KEY, header, JOB_A)
        assert caught.value.status in (401, 403)

    def test_without_a_key_nothing_is_accepted(self) -> None:
        with pytest.raises(ReportError) as caught:
            reports.authenticate(b"", f"Bearer {reports.job_token(b'', JOB_A)}", JOB_A)
        assert caught.value.status == 503


class TestParsing:
    def test_a_well_formed_report(self) -> None:
        report = parse(kind="checkpoint", checkpoint={"step": 10, "path": "/out/checkpoints/step-10"})
        assert (report.job, report.attempt, report.seq, report.kind) == (JOB_A, 0, 1, "checkpoint")

    def test_oversized_reports_are_refused_before_parsing(self) -> None:
        with pytest.raises(ReportError) as caught:
            reports.parse_report(b"{" + b" " * 70000 + b"}", 65536)
        assert caught.value.status == 413

    @pytest.mark.parametrize(("raw", "problem"), [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps(body(job={"name": "x"})).encode(), "job: must be an object"),
        (json.dumps(body(seq=-1)).encode(), "seq: must be an integer >= 0"),
        (json.dumps(body(attempt="0")).encode(), "attempt: must be an integer >= 0"),
        (json.dumps(body(kind="explode")).encode(), "kind: must be one of"),
        (json.dumps(body(time="yesterday")).encode(), "time: must be an RFC 3339 timestamp"),
        (json.dumps(body(time="2026-03-01T12:00:00")).encode(), "time: must be an RFC 3339 timestamp"),
        (json.dumps(body(trainLoss="low")).encode(), "trainLoss: must be a finite number"),
        (b'{"trainLoss": NaN}', "trainLoss: must be a finite number"),
        (json.dumps(body(step=True)).encode(), "step: must be an integer >= 0"),
        (json.dumps(body(checkpoint={"path": 3})).encode(), "checkpoint: must be an object"),
        (json.dumps(body(results={"f1": "high"})).encode(), "results: must be an object"),
        (json.dumps(body(model=["x"])).encode(), "model: must be an object"),
    ])
    def test_malformed_reports_are_refused_naming_the_field(self, raw: bytes, problem: str) -> None:
        with pytest.raises(ReportError) as caught:
            reports.parse_report(raw, 65536)
        assert caught.value.status == 400
        assert problem in str(caught.value)


class TestReplayGuard:
    def test_sequence_numbers_must_grow_within_an_attempt(self) -> None:
        guard = reports.ReplayGuard()
        guard.record(parse(seq=5))
        guard.check(parse(seq=6))
        for seq in (5, 4):
            with pytest.raises(ReportError) as caught:
                guard.check(parse(seq=seq))
            assert caught.value.status == 409

    def test_a_new_attempt_starts_its_own_sequence_and_older_attempts_become_stale(self) -> None:
        guard = reports.ReplayGuard()
        guard.record(parse(seq=50))
        guard.check(parse(attempt=1, seq=1))
        guard.record(parse(attempt=1, seq=1))
        with pytest.raises(ReportError) as caught:
            guard.check(parse(attempt=0, seq=51))
        assert caught.value.reason == "StaleAttempt"

    def test_a_replacement_pod_may_restart_the_sequence_with_a_newer_started_report(self) -> None:
        guard = reports.ReplayGuard()
        guard.record(parse(seq=50, time="2026-03-01T12:00:00Z"))
        guard.check(parse(seq=1, kind="started", time="2026-03-01T12:10:00Z"))
        with pytest.raises(ReportError):  # a replayed old "started" does not reset anything
            guard.check(parse(seq=1, kind="started", time="2026-03-01T11:00:00Z"))


class TestThrottle:
    def test_one_write_per_interval_but_terminal_reports_always_pass(self) -> None:
        throttle = reports.WriteThrottle(2.0)
        assert throttle.due("u", 100.0, terminal=False)
        throttle.wrote("u", 100.0)
        assert not throttle.due("u", 101.0, terminal=False)
        assert throttle.wait_seconds("u", 101.0) == 1.0
        assert throttle.due("u", 101.0, terminal=True)
        assert throttle.due("u", 102.0, terminal=False)
        assert throttle.due("other", 101.0, terminal=False)


class TestStatusFromReports:
    def test_progress_and_metrics(self) -> None:
        patch = reports.merge_report({}, parse(valLoss=2.0, epoch=0.5, learningRate=1e-4), recent_checkpoints=5)
        assert patch["progress"] == {"step": 10, "totalSteps": 100, "epoch": 0.5, "tokensSeen": 1000,
                                     "attempt": 0, "percent": 10.0}
        assert patch["metrics"] == {"trainLoss": 2.5, "valLoss": 2.0, "learningRate": 1e-4}

    def test_a_started_report_begins_the_attempt_at_its_own_step(self) -> None:
        before = {"progress": {"step": 40, "totalSteps": 100, "attempt": 0}}
        fresh = reports.merge_report(before, parse(kind="started", attempt=1, step=None), recent_checkpoints=5)
        assert {k: fresh["progress"][k] for k in ("step", "startStep", "attempt", "percent")} == {
            "step": 0, "startStep": 0, "attempt": 1, "percent": 0.0}
        resumed = reports.merge_report(before, parse(kind="started", attempt=1, step=32), recent_checkpoints=5)
        assert (resumed["progress"]["step"], resumed["progress"]["startStep"]) == (32, 32)
        later = reports.merge_report(resumed, parse(kind="progress", attempt=1, step=35), recent_checkpoints=5)
        assert (later["progress"]["step"], later["progress"]["startStep"]) == (35, 32)

    def test_recent_checkpoints_are_kept_and_the_best_one_remembered(self) -> None:
        status: dict[str, Any] = {}
        for step, loss in ((10, 3.0), (20, 1.5), (30, 2.0)):
            status |= reports.merge_report(status, parse(seq=step, kind="checkpoint", checkpoint={
                "step": step, "path": f"/ckpt/step-{step}", "valLoss": loss}), recent_checkpoints=2)
        assert [c["step"] for c in status["checkpoints"]] == [20, 30]
        assert status["metrics"]["bestCheckpoint"] == {"step": 20, "path": "/ckpt/step-20", "valLoss": 1.5}

    def test_completed_reports_carry_results_and_the_model(self) -> None:
        patch = reports.merge_report({}, parse(kind="completed", step=100, results={"perplexity": 4.0},
                                               model={"uri": "pvc://m/x/model", "digest": "sha256:1"}),
                                     recent_checkpoints=5)
        assert patch["progress"]["percent"] == 100.0
        assert patch["results"] == {"perplexity": 4.0}
        assert patch["model"] == {"uri": "pvc://m/x/model", "digest": "sha256:1"}

    def test_the_model_folder_as_the_pod_sees_it_is_recorded_as_its_storage_uri(self) -> None:
        patch = reports.merge_report({}, parse(kind="completed", model={
            "uri": "/mnt/pvc/models/finetunes/alpha/model", "digest": "sha256:1"}), recent_checkpoints=5)
        assert patch["model"] == {"uri": "pvc://models/finetunes/alpha/model", "digest": "sha256:1"}


class TestResolvedHyperparameters:
    RESOLVED = {"epochs": 3, "batchSize": 8, "learningRate": 2e-4, "scheduler": "cosine", "warmupRatio": 0.03,
                "maxSeqLength": 512, "gradientAccumulationSteps": 4, "seed": 42,
                "automatic": ["batchSize", "learningRate"]}

    def test_a_started_report_writes_status_resolved(self) -> None:
        patch = reports.merge_report({}, parse(kind="started", resolved=self.RESOLVED), recent_checkpoints=5)
        assert patch["resolved"] == {**self.RESOLVED, "epochs": 3.0}

    def test_fields_a_newer_trainer_adds_are_dropped_not_refused(self) -> None:
        report = parse(kind="started", resolved={**self.RESOLVED, "loraRankSchedule": "x"})
        assert "loraRankSchedule" not in reports.merge_report({}, report, recent_checkpoints=5)["resolved"]

    @pytest.mark.parametrize(("resolved", "problem"), [
        ([1, 2], "resolved: must be an object"),
        ({"batchSize": "eight"}, "resolved.batchSize: must be an integer"),
        ({"automatic": "batchSize"}, "resolved.automatic"),
    ])
    def test_a_badly_typed_resolved_object_is_refused_naming_the_field(self, resolved: Any, problem: str) -> None:
        with pytest.raises(ReportError) as caught:
            parse(kind="started", resolved=resolved)
        assert caught.value.status == 400 and problem in str(caught.value)

    def test_reports_without_resolved_leave_it_alone(self) -> None:
        assert "resolved" not in reports.merge_report({}, parse(), recent_checkpoints=5)


class TestCheckOrder:
    """What a caller without the job's token can learn is only whether the body is JSON naming a job."""

    @pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a": ' * 50_000, json.dumps(body(results=json.loads(
        "[" * 20 + "]" * 20))).encode()])
    def test_deep_nesting_is_a_400_not_a_crash(self, raw: bytes) -> None:
        with pytest.raises(ReportError) as caught:
            reports.decode_report(raw, 1_000_000)
        assert (caught.value.status, caught.value.reason) == (400, "Malformed")
        assert f"more than {reports.MAX_REPORT_DEPTH} deep" in str(caught.value)

    def test_a_report_nested_up_to_the_bound_is_accepted(self) -> None:
        nested: Any = 1
        for _ in range(reports.MAX_REPORT_DEPTH - 1):
            nested = [nested]
        assert reports.decode_report(json.dumps({"extra": nested}).encode(), 65536)["extra"] == nested

    def test_the_job_is_known_before_any_other_field_is_checked(self) -> None:
        decoded = reports.decode_report(json.dumps(body(step="many", kind="explode")).encode(), 65536)
        assert reports.report_job(decoded) == JOB_A
        with pytest.raises(ReportError, match="step: must be an integer"):
            reports.validate_report(decoded, JOB_A)

    def test_a_report_naming_no_job_is_refused_before_authentication(self) -> None:
        with pytest.raises(ReportError, match="job: must be an object") as caught:
            reports.report_job(reports.decode_report(b'{"job": "alpha"}', 65536))
        assert caught.value.status == 400


class TestRateLimiter:
    def test_a_burst_then_the_rate_per_job(self) -> None:
        limiter = reports.RateLimiter(rate=2.0, burst=3)
        assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
        assert limiter.take("a", 0.0) == pytest.approx(0.5)
        assert limiter.take("b", 0.0) == 0.0, "another job has a bucket of its own"
        assert limiter.take("a", 0.5) == 0.0
        assert limiter.take("a", 0.5) == pytest.approx(0.5)

    def test_rate_zero_is_no_limit_and_a_forgotten_job_starts_full(self) -> None:
        unlimited = reports.RateLimiter(rate=0.0, burst=1)
        assert all(unlimited.take("a", 0.0) == 0.0 for _ in range(1000))
        limiter = reports.RateLimiter(rate=1.0, burst=1)
        limiter.take("a", 0.0)
        limiter.forget("a")
        assert limiter.take("a", 0.0) == 0.0
