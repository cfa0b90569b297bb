"""The local node runs pods as local processes and reports them like a kubelet."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from kubetune.dev import controlplane, localnode


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def node(cluster: controlplane.ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[localnode.LocalNode]:
    local = localnode.LocalNode(cluster.kubeconfig, tmp_path_factory.mktemp("node"), node_name="test-local-node")
    local.start()
    yield local
    local.stop()


@pytest.fixture
def namespace(cluster: controlplane.ControlPlane) -> str:
    name = f"node-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
             what="the default service account")
    return name


def python_pod(name: str, code: str, **extra: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "kubetune/trainer:test", "command": ["python", "-c", code]}
    container.update(extra.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [container], **extra}}


def pod_status(cluster: controlplane.ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout).get("status", {}) if proc.returncode == 0 else {}


def apply(cluster: controlplane.ControlPlane, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


class TestRunningPods:
    def test_pod_runs_with_its_env_volumes_and_reports_success_and_termination_message(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        cluster.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=config.json={\"x\": 1}")
        code = (
            "import json, os\n"
            "config = json.load(open('/etc/kubetune/config.json'))\n"
            "open('/data/out.txt', 'w').write(os.environ['GREETING'] + ' ' + os.environ['POD_NAME'])\n"
            "open('/dev/termination-log', 'w').write(json.dumps({'x': config['x'], 'ip': os.environ['POD_IP']}))\n"
        )
        pod = python_pod("hello", code, container={
            "env": [{"name": "WHO", "value": "world"}, {"name": "GREETING", "value": "hello $(WHO)"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "volumeMounts": [{"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
                             {"name": "data", "mountPath": "/data"}]},
            volumes=[{"name": "config", "configMap": {"name": "settings"}},
                     {"name": "data", "persistentVolumeClaim": {"claimName": "outputs"}}])
        apply(cluster, namespace, pod)
        status = wait_for(lambda: (s := pod_status(cluster, namespace, "hello")).get("phase") in ("Succeeded", "Failed") and s,
                          what="the pod to finish")
        terminated = status["containerStatuses"][0]["state"]["terminated"]
        assert status["phase"] == "Succeeded", terminated
        assert terminated["exitCode"] == 0
        message = json.loads(terminated["message"])
        assert message == {"x": 1, "ip": status["podIP"]}
        assert status["podIP"].startswith("127.") and not status["podIP"].startswith("127.0.")
        # The claim's folder outlives the pod, like a persistent volume.
        assert (node.workdir / "volumes" / namespace / "outputs" / "out.txt").read_text() == "hello world hello"

    def test_failing_container_reports_its_exit_code(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        apply(cluster, namespace, python_pod("fails", "import sys; print('boom'); sys.exit(78)"))
        status = wait_for(lambda: (s := pod_status(cluster, namespace, "fails")).get("phase") == "Failed" and s,
                          what="the pod to fail")
        terminated = status["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 78 and terminated["reason"] == "Error"
        log_file = node.log_path(namespace, "fails")
        assert log_file is not None and "boom" in log_file.read_text()

    def test_unrunnable_image_fails_the_pod_with_a_clear_message(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        pod = python_pod("vllm", "")
        pod["spec"]["containers"][0]["command"] = ["vllm-no-such-program", "serve"]
        apply(cluster, namespace, pod)
        status = wait_for(lambda: (s := pod_status(cluster, namespace, "vllm")).get("phase") == "Failed" and s,
                          what="the pod to fail")
        terminated = status["containerStatuses"][0]["state"]["terminated"]
        assert terminated["reason"] == "StartError" and "ImageNotRunnableLocally" in terminated["message"]


class TestScheduling:
    def test_pod_asking_for_a_gpu_the_node_lacks_stays_pending_as_unschedulable(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        pod = python_pod("gpu", "print(1)", container={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
        apply(cluster, namespace, pod)
        status = wait_for(lambda: (s := pod_status(cluster, namespace, "gpu")).get("conditions") and s,
                          what="a scheduling condition")
        condition = status["conditions"][0]
        assert condition["reason"] == "Unschedulable" and "nvidia.com/gpu" in condition["message"]
        assert status["phase"] == "Pending"


class TestControllersDriveTheNode:
    def test_job_controller_pods_run_and_the_job_completes(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
               "spec": {"backoffLimit": 0, "template": {"spec": python_pod("x", "print('done')")["spec"]}}}
        apply(cluster, namespace, job)
        wait_for(lambda: json.loads(cluster.kubectl("get", "job", "once", "-n", namespace, "-o", "json").stdout)
                 .get("status", {}).get("succeeded") == 1, what="the Job to succeed")

    def test_deployment_pod_becomes_ready_through_its_readiness_probe_and_dies_when_deleted(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        server = ("import http.server, os\n"
                  "http.server.ThreadingHTTPServer((os.environ['POD_IP'], 8000), http.server.SimpleHTTPRequestHandler)"
                  ".serve_forever()\n")
        template = python_pod("srv", server, container={
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "http", "containerPort": 8000}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}})
        template["spec"]["restartPolicy"] = "Always"
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "srv"},
                      "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "srv"}},
                               "template": {"metadata": {"labels": {"app": "srv"}}, "spec": template["spec"]}}}
        apply(cluster, namespace, deployment)
        wait_for(lambda: json.loads(cluster.kubectl("get", "deploy", "srv", "-n", namespace, "-o", "json").stdout)
                 .get("status", {}).get("availableReplicas") == 2, what="2 available replicas")
        pids = [pid for pid in node.running_processes() if "SimpleHTTPRequestHandler" in _cmdline(pid)]
        assert len(pids) == 2
        cluster.kubectl("delete", "deploy", "srv", "-n", namespace)
        wait_for(lambda: cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=srv", "-o", "name").stdout == "",
                 what="the pods to be gone")
        # By the cmdline too: a busy machine may hand a freed pid to a new process within seconds.
        wait_for(lambda: not any(_alive(pid) and "SimpleHTTPRequestHandler" in _cmdline(pid) for pid in pids),
                 timeout=30, what="the processes to end")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


class TestVolumesCannotHideEachOther:
    def test_emptydir_over_tmp_does_not_hide_volume_sources_under_tmp(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str
    ) -> None:
        # The node's work directory lives under /tmp in tests; a pod mounting an emptyDir at /tmp
        # must still see its PVC and ConfigMap volumes.
        assert str(node.workdir).startswith("/tmp/")
        cluster.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=k=v")
        code = "import os; assert open('/etc/cfg/k').read() == 'v'; open('/tmp/scratch', 'w').write('x'); " \
               "open('/mnt/pvc/data/f', 'w').write('ok')"
        pod = python_pod("shadow", code, container={"volumeMounts": [
            {"name": "scratch", "mountPath": "/tmp"}, {"name": "cfg", "mountPath": "/etc/cfg"},
            {"name": "data", "mountPath": "/mnt/pvc/data"}]},
            volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}},
                     {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}])
        apply(cluster, namespace, pod)
        status = wait_for(lambda: (s := pod_status(cluster, namespace, "shadow")).get("phase") in ("Succeeded", "Failed")
                          and s, what="the pod to finish")
        assert status["phase"] == "Succeeded", node.log_path(namespace, "shadow").read_text()  # type: ignore[union-attr]
        assert (node.workdir / "volumes" / namespace / "data" / "f").read_text() == "ok"


class TestTheImageStaysVisible:
    def test_a_volume_over_the_checkouts_parent_does_not_hide_the_python_environment(
        self, cluster: controlplane.ControlPlane, node: localnode.LocalNode, namespace: str, tmp_path: Path
    ) -> None:
        # CI clones the repository into a folder that may live under /tmp, and pods mount an
        # emptyDir at /tmp: the "image" (venv + kubetune's source) must still be there, as a
        # container image's files are.
        fake_checkout = tmp_path / "checkout"
        (fake_checkout / "pkg").mkdir(parents=True)
        (fake_checkout / "pkg" / "marker.txt").write_text("image file")
        script = localnode._mount_script([(node.workdir, "/tmp", False)], None, node.workdir, keep=[fake_checkout])
        proc = __import__("subprocess").run(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             script.replace('exec "$@"', f"cat {fake_checkout}/pkg/marker.txt; echo")],
            capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == "image file"

    def test_image_paths_cover_the_interpreter_and_the_source(self) -> None:
        paths = [str(p) for p in localnode.image_paths()]
        assert str(Path(__import__("sys").prefix).resolve()) in paths
        assert str(Path(localnode.__file__).resolve().parent.parent) in paths
