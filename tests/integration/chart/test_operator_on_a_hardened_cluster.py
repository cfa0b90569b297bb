"""The operator under the chart's RBAC on a hardened control plane of its own: the
OwnerReferencesPermissionEnforcement admission plugin on (as OpenShift runs it) and an audit log of
every Secret request. A job runs to success with no refused call, the operator creates its own
signing key, and the audit log shows it never received the data of a Secret it did not create.

There is no kubelet: the test ends pods as a kubelet would (as admin); the Job controller reacts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.dev import chart, controlplane
from tests.integration.chart.conftest import CHART_CRDS, finetunejob, restricted_namespace, wait_for

REPO = Path(__file__).resolve().parents[3]
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: RequestResponse
    resources: [{group: "", resources: ["secrets"]}]
  - level: None
"""
SQUATTER_VALUE = "not-for-the-operator-" + secrets.token_hex(8)


class Hardened:
    """The hardened control plane, a watched tenant namespace and the operator running in it."""

    def __init__(self, plane: controlplane.ControlPlane, namespace: str, release_namespace: str,
                 identity: chart.OperatorIdentity, log: Path) -> None:
        self.plane, self.namespace, self.release_namespace = plane, namespace, release_namespace
        self.identity, self.log = identity, log

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        proc = self.plane.kubectl("-n", namespace or self.namespace, "get", kind, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def condition(self, job: str, type_: str) -> dict[str, Any]:
        for condition in ((self.get("finetunejob", job) or {}).get("status") or {}).get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        return {}

    def end_pod(self, job_name: str, message: str) -> None:
        def live() -> dict[str, Any] | None:
            pods = json.loads(self.plane.kubectl("-n", self.namespace, "get", "pods", "-l",
                                                 f"batch.kubernetes.io/job-name={job_name}", "-o", "json").stdout)
            return next((p for p in pods["items"] if p["status"].get("phase") in (None, "Pending")), None)

        pod = wait_for(live, f"a pod of Job {job_name}", timeout=90)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        state = {"terminated": {"exitCode": 0, "message": message, "startedAt": now, "finishedAt": now,
                                "reason": "Completed"}}
        container = pod["spec"]["containers"][0]
        self.plane.kubectl("-n", self.namespace, "patch", "pod", pod["metadata"]["name"], "--subresource=status",
                           "--type=merge", "-p", json.dumps({"status": {
                               "phase": "Succeeded", "startTime": now,
                               "containerStatuses": [{"name": container["name"], "image": container["image"],
                                                      "imageID": "", "ready": False, "restartCount": 0,
                                                      "started": False, "state": state}]}}))

    def operator_secret_requests(self) -> list[dict[str, Any]]:
        events = [json.loads(line) for line in self.plane.audit_log.read_text().splitlines() if line.strip()]
        return [e for e in events if e.get("user", {}).get("username") == self.identity.username
                and (e.get("objectRef") or {}).get("resource") == "secrets"]


@pytest.fixture(scope="module")
def hardened(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hardened]:
    workdir = tmp_path_factory.mktemp("hardened-plane")
    with controlplane.ControlPlane(workdir, extra_admission_plugins=("OwnerReferencesPermissionEnforcement",),
                                   audit_policy=AUDIT_POLICY) as plane:
        plane.kubectl("apply", "--server-side", "-f", str(CHART_CRDS))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
        namespace, release_namespace = "tenant-hardened", "kubetune-hardened"
        restricted_namespace(plane, namespace)
        identity = chart.install_operator_rbac(plane, helm_bin, {"watchNamespaces": [namespace]},
                                               release="kubetune", namespace=release_namespace)
        log = workdir / "operator.log"
        port = controlplane.free_port()
        env = {**os.environ, "KUBECONFIG": str(identity.kubeconfig), "KUBETUNE_NAMESPACES": namespace,
               "KUBETUNE_HTTP_HOST": "127.0.0.1", "KUBETUNE_HTTP_PORT": str(port),
               "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1/reports",
               # No key given: the operator must create (and later reuse) its own signing-key Secret.
               "KUBETUNE_SECRET_KEY": "", "KUBETUNE_SECRET_KEY_SECRET": f"{release_namespace}/kubetune-progress-key",
               "KUBETUNE_RESYNC_SECONDS": "2", "KUBETUNE_TRAINER_IMAGE": "kubetune-trainer:test",
               "KUBETUNE_PEERING": "kubetune-hardened"}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kubetune.operator"], env=env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield Hardened(plane, namespace, release_namespace, identity, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_job_runs_to_success_with_owner_reference_enforcement(hardened: Hardened) -> None:
    job = "hardened"
    hardened.plane.kubectl("-n", hardened.namespace, "apply", "-f", "-", input=yaml.safe_dump(finetunejob(job)))
    wait_for(lambda: hardened.get("job", f"{job}-validate"), "the validation Job", timeout=90)
    hardened.end_pod(f"{job}-validate", json.dumps({"outcome": "succeeded", "message": "100 examples"}))
    wait_for(lambda: hardened.get("job", f"{job}-train"), "the trainer Job", timeout=60)
    hardened.end_pod(f"{job}-train", json.dumps({"outcome": "succeeded", "step": 3, "message": "done"}))
    wait_for(lambda: hardened.condition(job, "Succeeded").get("status") == "True", "Succeeded=True", timeout=60)
    refused = [line for line in hardened.log.read_text(errors="replace").splitlines()
               if re.search(r"(?<![,.\d])403\b", line) or "forbidden" in line.lower()]  # not a log time's ,403 ms
    assert refused == []


def test_the_operator_created_its_signing_key(hardened: Hardened) -> None:
    key = wait_for(lambda: hardened.get("secret", "kubetune-progress-key", hardened.release_namespace),
                   "the signing-key Secret")
    assert len(base64.b64decode(key["data"]["secret-key"])) >= 32
    creates = [e for e in hardened.operator_secret_requests()
               if e["verb"] == "create" and e["objectRef"].get("namespace") == hardened.release_namespace]
    assert creates and creates[0]["responseStatus"]["code"] == 201


def test_it_never_receives_a_secret_it_did_not_create(hardened: Hardened) -> None:
    # Someone else's Secret under the name of a job's progress Secret, made before the job.
    hardened.plane.kubectl("-n", hardened.namespace, "create", "secret", "generic", "squatted-progress",
                           f"--from-literal=token={SQUATTER_VALUE}")
    hardened.plane.kubectl("-n", hardened.namespace, "apply", "-f", "-",
                           input=yaml.safe_dump(finetunejob("squatted")))
    wait_for(lambda: hardened.condition("squatted", "Running").get("reason") == "ChildNameConflict",
             "Running=False ChildNameConflict")
    assert "Secret squatted-progress has no controller" in hardened.condition("squatted", "Running")["message"]

    requests = hardened.operator_secret_requests()
    assert requests, "the audit log recorded none of the operator's Secret requests"
    assert {e["verb"] for e in requests} <= {"create", "get"}  # never list or watch
    created = {(e["objectRef"].get("namespace"), e["objectRef"].get("name") or e.get("responseObject", {}).get(
        "metadata", {}).get("name")) for e in requests if e["verb"] == "create"}
    for event in (e for e in requests if e["verb"] == "get"):
        ref = (event["objectRef"].get("namespace"), event["objectRef"]["name"])
        answer = event.get("responseObject") or {}
        if ref in created and ref[0] == hardened.release_namespace:
            continue  # its own signing key, read back after a restart
        if event["responseStatus"]["code"] != 200:
            continue  # not found: nothing was received
        assert answer.get("kind") == "PartialObjectMetadata" and "data" not in answer, (ref, answer.get("kind"))
    squatter_reads = [e for e in requests if e["verb"] == "get" and e["objectRef"]["name"] == "squatted-progress"]
    assert squatter_reads and all(e["responseStatus"]["code"] == 200 for e in squatter_reads)
    assert SQUATTER_VALUE not in json.dumps(requests)
