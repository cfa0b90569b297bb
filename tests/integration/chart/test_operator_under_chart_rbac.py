"""The operator, run as a real process with the chart's RBAC (namespaced mode) instead of as admin,
takes a FineTuneJob from validation through training to Succeeded without a single refused call.

There is no kubelet: the test patches pod status as the kubelet would (as admin), the real Job
controller reacts; everything the operator does goes through its ServiceAccount's permissions.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart
from kubetune.operator import names
from tests.integration.chart.conftest import finetunejob, restricted_namespace, wait_for

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Scene:
    """A watched tenant namespace, the operator's identity and process, and admin-side helpers."""

    def __init__(self, cluster: Any, namespace: str, identity: chart.OperatorIdentity, log: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.identity = identity
        self.log = log

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        proc = self.cluster.kubectl("-n", self.namespace, "get", kind, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def condition(self, job: str, type_: str) -> dict[str, Any] | None:
        body = self.get("finetunejob", job) or {}
        for condition in (body.get("status") or {}).get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        return None

    def live_pod(self, job_name: str) -> dict[str, Any] | None:
        pods = json.loads(self.cluster.kubectl("-n", self.namespace, "get", "pods", "-l",
                                               f"batch.kubernetes.io/job-name={job_name}", "-o", "json").stdout)
        for pod in pods["items"]:
            if pod["status"].get("phase") in (None, "Pending") and not pod["metadata"].get("deletionTimestamp"):
                return dict(pod)
        return None

    def run_pod_to_end(self, job_name: str, exit_code: int, message: str) -> None:
        """Runs the Job's next pod and ends it, as a kubelet would (as admin)."""
        pod = wait_for(lambda: self.live_pod(job_name), f"a pod of Job {job_name}")
        container = pod["spec"]["containers"][0]
        now = _now()
        state = {"terminated": {"exitCode": exit_code, "message": message, "startedAt": now, "finishedAt": now,
                                "reason": "Completed" if exit_code == 0 else "Error"}}
        status = {"status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed", "startTime": now,
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": False, "restartCount": 0, "started": False, "state": state}]}}
        self.cluster.kubectl("-n", self.namespace, "patch", "pod", pod["metadata"]["name"], "--subresource=status",
                             "--type=merge", "-p", json.dumps(status))

    def refused_calls(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if "(403)" in line or "forbidden" in line.lower()]  # not "403" alone: a log time can hold it


@pytest.fixture(scope="module")
def scene(cluster: Any, helm_bin: Path, chart_crds: None,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    suffix = secrets.token_hex(3)
    namespace = f"kubetune-rbac-run-{suffix}"
    restricted_namespace(cluster, namespace)
    identity = chart.install_operator_rbac(cluster, helm_bin, {"watchNamespaces": [namespace]},
                                           release=f"run-{suffix}", namespace=f"kubetune-run-{suffix}")
    log = tmp_path_factory.mktemp("operator-under-chart-rbac") / "operator.log"
    port = _free_port()
    env = {**os.environ, "KUBECONFIG": str(identity.kubeconfig), "KUBETUNE_NAMESPACES": namespace,
           "KUBETUNE_HTTP_HOST": "127.0.0.1", "KUBETUNE_HTTP_PORT": str(port), "KUBETUNE_METRICS_PORT": "0",
           "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1/reports",
           "KUBETUNE_SECRET_KEY": secrets.token_hex(16), "KUBETUNE_RESYNC_SECONDS": "2",
           "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test", "KUBETUNE_PEERING": f"kubetune-rbac-{suffix}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune.operator"], env=env, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield Scene(cluster, namespace, identity, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_job_runs_to_success_with_no_refused_call(scene: Scene) -> None:
    job = "under-rbac"
    scene.cluster.kubectl("-n", scene.namespace, "apply", "-f", "-", input=yaml.safe_dump(finetunejob(job)))

    validation = names.validation_job(job)
    wait_for(lambda: scene.get("job", validation), "the validation Job (created by the operator)", timeout=90)
    assert scene.get("configmap", names.config_map(job)) is not None
    assert scene.get("secret", names.progress_secret(job)) is not None
    scene.run_pod_to_end(validation, 0, json.dumps({"outcome": "succeeded", "message": "100 examples"}))

    trainer = names.trainer_job(job)
    wait_for(lambda: scene.get("job", trainer), "the trainer Job (after validation)", timeout=60)
    summary = {"outcome": "succeeded", "step": 10, "valLoss": 2.0, "results": {"perplexity": 7.4},
               "modelDigest": "sha256:" + "cd" * 32, "message": "trained 10 steps"}
    scene.run_pod_to_end(trainer, 0, json.dumps(summary))
    succeeded = wait_for(lambda: (c := scene.condition(job, "Succeeded")) and c["status"] == "True" and c,
                         "Succeeded=True", timeout=60)
    assert succeeded["observedGeneration"] == 1

    def events() -> list[Any]:  # posted in the background, a moment after the status
        return list(json.loads(scene.cluster.kubectl("-n", scene.namespace, "get", "events", "--field-selector",
                                                     f"involvedObject.name={job}", "-o", "json").stdout)["items"])

    wait_for(events, "the operator's Events (create events refused?)", timeout=30)
    time.sleep(2)  # a resync under the same permissions
    assert scene.refused_calls() == []
