"""The MLflow tracker's promises that need no real server: credentials only from the environment, a
server that never answers costs one timeout and turns tracking off, a server too slow for the metrics
turns it off instead of buffering without bound, and a disabled tracker does nothing. (Logging to a real
MLflow server: tests/integration/tracking.)"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubetune.api import config as cfg, process as api_process
from kubetune.api.finetunejob import MlflowTracking
from kubetune.trainer import tracking

JOB = cfg.JobIdentity(namespace="team-a", name="tune", uid="u-1")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def tracker(uri: str, tmp_path: Path, client: tracking.MlflowClient) -> tracking.Tracker:
    return tracking.Tracker(MlflowTracking(tracking_uri=uri), JOB, attempt=0, output_dir=tmp_path, client=client)


def test_credentials_come_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(api_process.ENV_MLFLOW_TOKEN, "tok")
    assert tracking.MlflowClient.from_environment("http://m")._headers == {"Authorization": "Bearer tok"}
    monkeypatch.delenv(api_process.ENV_MLFLOW_TOKEN)
    monkeypatch.setenv(api_process.ENV_MLFLOW_USERNAME, "ci")
    monkeypatch.setenv(api_process.ENV_MLFLOW_PASSWORD, "pw")
    basic = base64.b64encode(b"ci:pw").decode()
    assert tracking.MlflowClient.from_environment("http://m")._headers == {"Authorization": f"Basic {basic}"}


def test_a_server_that_never_answers_costs_one_timeout_and_is_reported_unavailable(
        silent_server: str, tmp_path: Path) -> None:
    run = tracker(silent_server, tmp_path, tracking.MlflowClient(silent_server, timeout=0.5))
    started = time.monotonic()

    run.start({"learningRate": "0.001"})
    run.observe({"kind": "progress", "step": 1, "learningRate": 0.001})
    run.finish({"results": {"loss": 1.0}}, tmp_path)

    assert time.monotonic() - started < 3
    status = run.status()
    assert status is not None and status["state"] == "unavailable"
    assert silent_server in status["message"] and "training goes on" in status["message"]


class _SlowClient(tracking.MlflowClient):
    """Answers setup at once; every metric batch waits until released."""

    def __init__(self) -> None:
        super().__init__("http://slow")
        self.release = threading.Event()
        self.batches = 0

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        if path.endswith("experiments/get-by-name?experiment_name=team-a"):
            return {"experiment": {"experiment_id": "1"}}
        if path.endswith("runs/create"):
            return {"run": {"info": {"run_id": "r1", "artifact_uri": "mlflow-artifacts:/1/r1/artifacts"}}}
        if path.endswith("log-batch") and body and body["metrics"]:
            self.batches += 1
            self.release.wait(10)
        return {}


def test_a_server_too_slow_for_the_metrics_turns_tracking_off_instead_of_buffering(tmp_path: Path) -> None:
    client = _SlowClient()
    run = tracker("http://slow", tmp_path, client)
    run.start({})
    state = SimpleNamespace(train_losses=[], evaluations=[])
    run.follow(state)

    for step in range(1, tracking.MAX_PENDING_BATCHES + 10):
        state.train_losses.append([step, 1.0])
        run.observe({"kind": "progress", "step": step})

    status = run.status()
    assert status is not None and status["state"] == "unavailable" and "too slow" in status["message"]
    assert status["runId"] == "r1"
    assert run._outbox.qsize() <= tracking.MAX_PENDING_BATCHES
    client.release.set()
    run.end("FAILED")
    assert client.batches <= 2  # what was in flight; nothing queued after tracking went off is sent


def test_without_tracking_settings_nothing_happens(tmp_path: Path) -> None:
    run = tracking.Tracker(None, JOB, attempt=0, output_dir=tmp_path)
    run.start({"a": "b"})
    run.observe({"kind": "progress", "step": 1})
    run.finish({}, tmp_path)
    run.end("KILLED")
    assert run.status() is None and not (tmp_path / tracking.STATE_FILE).exists()


def test_a_url_with_credentials_is_refused_by_the_trainer_config() -> None:
    with pytest.raises(cfg.ConfigError, match="tracking.mlflow.trackingUri: must not carry credentials"):
        cfg.config_from_dict({"model": {"source": "/m"}, "dataset": {"format": "text", "train": {"source": "/t"}},
                              "output": {"dir": "/o"},
                              "tracking": {"mlflow": {"trackingUri": "https://u:p@mlflow.example.com"}}})
