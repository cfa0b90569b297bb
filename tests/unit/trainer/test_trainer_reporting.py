"""Progress reports on stdout and the termination message's size limit."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune.trainer import config as cfg
from kubetune.trainer import reporting


def test_reports_are_numbered_json_lines_without_empty_fields() -> None:
    stream = io.StringIO()
    reporter = reporting.Reporter(cfg.JobIdentity("ns", "job", "uid"), attempt=1, stream=stream)

    reporter.report("started")
    reporter.report("progress", step=3, valLoss=None, trainLoss=2.5)

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["job"] == {"namespace": "ns", "name": "job", "uid": "uid"} and first["attempt"] == 1
    assert second["step"] == 3 and "valLoss" not in second
    assert second["time"].endswith("Z")


def test_termination_summary_stays_under_4_kib_by_dropping_details_first() -> None:
    results = {"accuracy": 0.9, "perClass": {f"label-{i}": {"f1": 0.5} for i in range(500)}}

    text = reporting.termination_summary("succeeded", step=10, val_loss=1.0, results=results, message="ok")

    summary = json.loads(text)
    assert len(text.encode()) < 4096
    assert summary["results"] == {"accuracy": 0.9}
    assert summary["outcome"] == "succeeded" and summary["step"] == 10


def test_termination_log_path_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cfg.ENV_TERMINATION_LOG, str(tmp_path / "log"))

    reporting.write_termination_message('{"outcome": "failed"}')

    assert json.loads((tmp_path / "log").read_text()) == {"outcome": "failed"}
