"""A real MLflow tracking server on loopback (`mlflow server`), for the experiment-tracking tests.

It keeps runs in SQLite and serves artifacts itself (`--artifacts-destination`, the `mlflow-artifacts`
proxy the trainer uploads through), all in a temporary folder, on a random free port, with one worker.
The server is the `mlflow` package of the dev extra (the trainer image does not carry it: the trainer
speaks the REST API). ``stop()`` (or leaving the ``with`` block) ends the server and its worker
(SIGTERM to the process group, SIGKILL after 10 s); the orphan guard ends them if the test process dies.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.dev.controlplane import free_port
from kubetune.dev.loopback import LoopbackServer


class MlflowServerError(RuntimeError):
    """The MLflow server could not be started."""


class MlflowServer(LoopbackServer):
    """`mlflow server` on 127.0.0.1 with SQLite and proxied artifacts; `url` is the tracking URI."""

    log_name = "mlflow.log"
    error = MlflowServerError

    def __init__(self, workdir: Path, *, ready_timeout: float = 120.0) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout, pids_name="mlflow.pids")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
        if mlflow is None:
            raise MlflowServerError("the mlflow command is missing: pip install -e '.[dev]'")
        return [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination", str(self.workdir / "artifacts"), "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--allowed-hosts", f"127.0.0.1:{self.port},127.0.0.1,localhost:{self.port},localhost"]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                            "MLFLOW_ENABLE_WORKSPACES": "false"}
        self.start_process(self.command(), self._answers, what="mlflow server", poll_seconds=0.5, group=True,
                           env=env)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **query: Any) -> dict[str, Any]:
        """GET one REST endpoint (`/api/2.0/mlflow/...`) with query parameters: the tests' read-back."""
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as response:
            return dict(json.loads(response.read()))

    def search_runs(self, experiment_id: str) -> list[dict[str, Any]]:
        """Every run of one experiment (POST runs/search)."""
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return list(json.loads(response.read()).get("runs", []))
