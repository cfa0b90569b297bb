"""Progress reports on stdout and the termination message's size limit."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from pathlib import Path

import pytest

from kubetune.api import config as cfg, process as api_process
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


def test_termination_summary_carries_the_tokens_this_process_trained_on() -> None:
    # The operator charges these (status.usage): the pod writes them, not a forgeable report.
    summary = json.loads(reporting.termination_summary("preempted", message="SIGTERM", tokens_processed=4096))
    assert summary["tokensProcessed"] == 4096
    assert "tokensProcessed" not in json.loads(reporting.termination_summary("failed", message="bad data"))


def test_termination_log_path_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(api_process.ENV_TERMINATION_LOG, str(tmp_path / "log"))

    reporting.write_termination_message('{"outcome": "failed"}')

    assert json.loads((tmp_path / "log").read_text()) == {"outcome": "failed"}


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """Answers the first `busy` POSTs with 429 (Retry-After: 1), later ones with 202; records bodies."""

    busy = 0
    received: list[tuple[int, dict[str, object]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = 429 if type(self).busy > 0 else 202
        type(self).busy -= 1
        type(self).received.append((status, payload))
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def test_a_429_is_waited_out_and_the_same_report_sent_again_in_order() -> None:
    _Endpoint.busy, _Endpoint.received = 2, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reporter = reporting.Reporter(cfg.JobIdentity("ns", "job", "uid"), url=f"http://127.0.0.1:{server.server_address[1]}",
                                      token="t", stream=io.StringIO())
        reporter.report("progress", step=1)
        reporter.report("progress", step=2)
        started = time.monotonic()
        reporter.close(timeout=30)
        waited = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()

    assert [(status, body["seq"]) for status, body in _Endpoint.received] == [(429, 1), (429, 1), (202, 1), (202, 2)]
    assert reporter.failed_posts == 0
    assert waited >= 2.0, "each Retry-After: 1 was honoured"


@pytest.mark.parametrize(("header", "seconds"), [(None, 1.0), ("0", 0.0), ("2", 2.0), ("3600", 5.0), ("soon", 1.0)])
def test_retry_after_is_read_and_capped(header: str | None, seconds: float) -> None:
    assert reporting._retry_after(header) == seconds
