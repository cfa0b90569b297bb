"""A real MLflow tracking server on loopback (`mlflow server`), for the experiment-tracking tests.

It keeps runs in SQLite and serves artifacts itself (`--artifacts-destination`, the `mlflow-artifacts`
proxy the trainer uploads through), all in a temporary folder, on a random free port, with one worker.
The server is the `mlflow` package of the dev extra (the trainer image does not carry it: the trainer
speaks the REST API). ``stop()`` (or leaving the ``with`` block) ends the server and its worker
(SIGTERM to the process group, SIGKILL after 10 s); the orphan guard ends them if the test process dies.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.dev import orphans


class MlflowServerError(RuntimeError):
    """The MLflow server could not be started."""


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc), so the guard can end the server's worker too."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with SQLite and proxied artifacts; `url` is the tracking URI."""

    def __init__(self, workdir: Path, *, ready_timeout: float = 120.0) -> None:
        self.workdir = workdir
        self.ready_timeout = ready_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._guard = orphans.ProcessGuard(workdir / "mlflow.pids")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        self._log = open(self.workdir / "mlflow.log", "ab")  # noqa: SIM115 - closed by stop()
        self._proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                      start_new_session=True, preexec_fn=orphans.die_with_parent)
        self._guard.add(self._proc.pid)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MlflowServerError(f"mlflow server exited with {self._proc.returncode}: {self.log_tail()}")
            if self._answers():
                for pid in _descendants(self._proc.pid):
                    self._guard.add(pid)
                return
            time.sleep(0.5)
        self.stop()
        raise MlflowServerError(f"mlflow server did not answer in {self.ready_timeout:.0f}s: {self.log_tail()}")

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

    def log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "mlflow.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Ends the server and its worker (SIGTERM to its process group, SIGKILL after 10 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            workers = _descendants(proc.pid)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind by its server
            self._guard.discard(proc.pid)
            for pid in workers:
                self._guard.discard(pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._guard.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
