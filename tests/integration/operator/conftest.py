"""Fixtures for the operator's integration tests: the CRD, the operator as a real process, tenant namespaces.

There is no kubelet: tests play its part by patching pod status (phase,
container state, exit code, termination message); the real Job controller and
garbage collector react to that.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

REPO = Path(__file__).resolve().parents[3]
CRD_FILE = Path(os.environ.get("KUBETUNE_TEST_CRD") or REPO / "crds" / "finetunejobs.kubetune.io.yaml")
NAMESPACE_PREFIX = "kubetune-optest-"
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (ApiException, KeyError, IndexError, TypeError) as error:
            last_error = error
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Kube:
    """The API groups tests use, plus kubelet-like pod driving."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def plain(self, obj: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return result

    def ftj(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        return result

    def create_ftj(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return result

    def patch_ftj(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        for condition in (self.ftj(namespace, name).get("status") or {}).get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        return None

    def condition_is(self, namespace: str, name: str, type_: str, status: str, reason: str | None = None) -> bool:
        found = self.condition(namespace, name, type_)
        return found is not None and found["status"] == status and (reason is None or found["reason"] == reason)

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(self.batch.read_namespaced_job(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
        return [self.plain(p) for p in pods.items]

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(self.apps.read_namespaced_deployment(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.plain(self.core.read_namespaced_service(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods_with(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Live pods (not ended, not being deleted) matching a label selector."""
        pods = [self.plain(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]
        return [p for p in pods if p["status"].get("phase") in ("Pending", "Running")
                and not p["metadata"].get("deletionTimestamp")]

    def live_pod(self, namespace: str, job_name: str) -> dict[str, Any] | None:
        """The job's pod that has not ended and is not being deleted."""
        for pod in self.pods(namespace, job_name):
            if pod["status"].get("phase") in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp"):
                return pod
        return None

    def set_pod_running(self, namespace: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        now = _now()
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], namespace, {"status": {
            "phase": "Running", "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": now}}}]}})

    def set_pod_finished(self, namespace: str, pod: dict[str, Any], exit_code: int, message: str = "",
                         disrupted: bool = False) -> None:
        container = pod["spec"]["containers"][0]
        now = _now()
        conditions = [{"type": "Ready", "status": "False", "lastTransitionTime": now}]
        if disrupted:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                               "lastTransitionTime": now})
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], namespace, {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": conditions,
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": False, "restartCount": 0, "started": False,
                                   "state": {"terminated": {"exitCode": exit_code, "message": message,
                                                            "reason": "Completed" if exit_code == 0 else "Error",
                                                            "startedAt": now, "finishedAt": now}}}]}})

    def run_pod_to_end(self, namespace: str, job_name: str, exit_code: int, message: str = "") -> dict[str, Any]:
        """Waits for the Job's next pod, then runs and ends it as a kubelet would."""
        pod = wait_for(lambda: self.live_pod(namespace, job_name), f"a pod of Job {job_name}")
        self.set_pod_running(namespace, pod)
        self.set_pod_finished(namespace, pod, exit_code, message)
        return pod


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class OperatorProcess:
    """`python -m kubetune.operator` as a child process, restartable."""

    def __init__(self, kubeconfig: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.secret_key = secrets.token_hex(16)
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_NAMESPACES": f"{NAMESPACE_PREFIX}*",
            "KUBETUNE_HTTP_HOST": "127.0.0.1",
            "KUBETUNE_HTTP_PORT": str(self.port),
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{self.port}/v1/reports",
            "KUBETUNE_SECRET_KEY": self.secret_key,
            "KUBETUNE_RESYNC_SECONDS": "2",
            "KUBETUNE_STATUS_WRITE_INTERVAL": "0.5",
            "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
            "KUBETUNE_PEERING": f"kubetune-test-{secrets.token_hex(3)}",
        }
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubetune.operator"], env=self.env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._healthy, "the operator's /healthz", timeout=60)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"the operator exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            # the metrics port is plain HTTP whether or not the report port serves HTTPS
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """An abrupt end (SIGKILL), as when the operator's pod is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        path = self.log_dir / f"operator-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def post_report(self, report: dict[str, Any], token: str | None, raw: bytes | None = None) -> tuple[int, Any]:
        """POSTs a report over real HTTP; returns (status, parsed JSON answer)."""
        data = raw if raw is not None else json.dumps(report).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(f"{self.url}/v1/reports", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return str(response.read().decode())


@pytest.fixture(scope="module")
def kube(cluster: Any) -> Kube:
    return Kube(cluster.api_client())


@pytest.fixture(scope="module")
def finetunejob_crd(cluster: Any) -> None:
    if not CRD_FILE.exists():
        pytest.fail(f"the FineTuneJob CRD is missing: {CRD_FILE}")
    cluster.kubectl("apply", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")


@pytest.fixture(scope="module")
def operator(cluster: Any, finetunejob_crd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator"))
    process.start()
    yield process
    process.stop()


@pytest.fixture
def namespace(cluster: Any, kube: Kube) -> Iterator[str]:
    """A tenant namespace that enforces the `restricted` Pod Security level."""
    name = f"{NAMESPACE_PREFIX}{secrets.token_hex(4)}"
    kube.core.create_namespace({"metadata": {"name": name, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}})
    yield name
    kube.core.delete_namespace(name)


def finetunejob(name: str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob manifest in the contract's vocabulary."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": "pvc://models/base/tiny-gpt2"},
            "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
            "output": {"storage": "pvc://models/finetunes"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
            "backoffLimit": 2,
        },
    }
    body["spec"].update(spec)
    return body
