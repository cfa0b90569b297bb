"""The whole product on one machine: control plane, CRDs, operator, local node.

:class:`LocalStack` is what ``kubetune dev`` and the end-to-end tests start. The
operator runs as a real subprocess (``python -m kubetune.operator``), exactly as
in its pod but with the local control plane's kubeconfig, so tests can kill and
restart it; the local node runs the pods it creates as local processes.

Persistent volume claims are folders of the local node
(``<workdir>/node/volumes/<namespace>/<claim>``): :meth:`LocalStack.claim_path`
lets ``kubetune dev`` and tests put base models and datasets where a
FineTuneJob's ``pvc://claim/path`` sources find them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.dev import controlplane, localnode, orphans

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = REPO_ROOT / "crds"


class StackError(RuntimeError):
    """A part of the local stack did not start."""


class LocalStack:
    """Control plane + CRDs + operator subprocess + local node. Use as a context manager."""

    def __init__(self, workdir: Path, *, operator_env: dict[str, str] | None = None,
                 resync_seconds: float = 10.0, with_node: bool = True, node_gpus: int = 0) -> None:
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plane = controlplane.ControlPlane(self.workdir / "controlplane")
        self.node: localnode.LocalNode | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_port = controlplane.free_port()
        self.metrics_port = controlplane.free_port()
        self.secret_key = secrets.token_hex(32)
        self.operator_env = dict(operator_env or {})
        self.resync_seconds = resync_seconds
        self.node_gpus = node_gpus
        """GPUs the local node advertises (pods still run on the CPU): lets a manifest asking for GPUs schedule."""
        self._guard = orphans.ProcessGuard(self.workdir / "operator.pids")
        self.operator_restarts = 0
        self.with_node = with_node
        """False: no local node, pods stay Pending unless a test plays the kubelet (load tests)."""

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def operator_url(self) -> str:
        """The operator's progress-report server."""
        return f"http://127.0.0.1:{self.operator_port}"

    @property
    def metrics_url(self) -> str:
        """The operator's metrics server (`/metrics`)."""
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        """Starts everything and waits until each part answers."""
        self.plane.start()
        try:
            self.install_crds()
            if self.with_node:
                self.node = localnode.LocalNode(self.kubeconfig, self.workdir / "node", gpus=self.node_gpus)
                self.node.start()
            self.start_operator()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stops the operator, every pod process and the control plane."""
        self.stop_operator()
        if self.node is not None:
            self.node.stop()
        self._guard.close()
        self.plane.stop()

    def install_crds(self) -> None:
        """Applies every CRD in crds/ and waits until the API server serves them."""
        files = sorted(CRD_DIR.glob("*.yaml"))
        if not files:
            raise StackError(f"no CRDs in {CRD_DIR}")
        for path in files:
            self.plane.kubectl("apply", "--server-side", "-f", str(path))
        for path in files:
            name = _crd_name(path)
            self.plane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")

    # -- the operator ----------------------------------------------------------------

    def operator_environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_SECRET_KEY": self.secret_key,
            "KUBETUNE_HTTP_HOST": "127.0.0.1",
            "KUBETUNE_HTTP_PORT": str(self.operator_port),
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_PROGRESS_URL": f"{self.operator_url}/v1/reports",
            "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:local",
            "KUBETUNE_RESYNC_SECONDS": str(self.resync_seconds),
            **self.operator_env,
        }

    def start_operator(self) -> None:
        """Starts ``python -m kubetune.operator`` and waits for its metrics endpoint."""
        log = open(self.workdir / "operator.log", "ab")
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "kubetune.operator"], env=self.operator_environment(),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=orphans.die_with_parent,
        )
        log.close()
        self._guard.add(self.operator.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.operator.poll() is not None:
                raise StackError(f"the operator exited with {self.operator.returncode}; see {self.workdir / 'operator.log'}")
            if controlplane._http_ok(f"{self.metrics_url}/metrics"):
                return
            time.sleep(0.3)
        raise StackError(f"the operator did not serve /metrics within 60 s; see {self.workdir / 'operator.log'}")

    def stop_operator(self, kill: bool = False) -> None:
        """Stops the operator: SIGTERM (graceful) or SIGKILL (a crash, for fault tests)."""
        proc, self.operator = self.operator, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._guard.discard(proc.pid)

    def log_tail(self, lines: int = 80) -> str:
        """The operator log's last lines (every operator this stack started writes to one file)."""
        path = self.workdir / "operator.log"
        if not path.exists():
            return "(no operator log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def restart_operator(self, kill: bool = True) -> None:
        self.stop_operator(kill=kill)
        self.operator_restarts += 1
        self.start_operator()

    # -- helpers for users and tests ---------------------------------------------------

    def claim_path(self, namespace: str, claim: str) -> Path:
        """The folder that backs PVC ``claim`` in ``namespace`` on the local node."""
        path = self.workdir / "node" / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def ensure_namespace(self, namespace: str) -> None:
        if self.plane.kubectl("get", "namespace", namespace, check=False).returncode != 0:
            self.plane.kubectl("create", "namespace", namespace)
        wait_until(lambda: self.plane.kubectl("get", "serviceaccount", "default", "-n", namespace,
                                              check=False).returncode == 0, 30, "the default service account")

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        proc = self.plane.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Polls ``predicate`` until it returns something truthy; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _crd_name(path: Path) -> str:
    import yaml

    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            return str(doc["metadata"]["name"])
    raise StackError(f"{path} holds no CustomResourceDefinition")
