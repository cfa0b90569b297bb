"""The real control plane that every integration test stands on.

These tests prove that the API server behaviours kubetune relies on are really
there: namespace finalization, owner-reference garbage collection, RBAC and Pod
Security admission.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import kubernetes
import pytest

from kubetune.dev import controlplane


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def exists(cluster: controlplane.ControlPlane, *args: str) -> bool:
    return cluster.kubectl("get", *args, check=False).returncode == 0


class TestServer:
    def test_reports_the_built_version(self, cluster: controlplane.ControlPlane) -> None:
        version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
        assert version["serverVersion"]["gitVersion"] == "v1.37.2"
        assert version["clientVersion"]["gitVersion"] == "v1.37.2"

    def test_listens_on_loopback_with_tls_and_token_auth(self, cluster: controlplane.ControlPlane) -> None:
        assert cluster.server.startswith("https://127.0.0.1:")
        assert controlplane._http_ok(f"{cluster.server}/readyz", token=cluster.admin_token,
                                     ca=cluster.certs.ca_crt if cluster.certs else None)
        # Without credentials the request is anonymous and RBAC forbids /api.
        assert not controlplane._http_ok(f"{cluster.server}/api", insecure=True)


class TestNamespaces:
    def test_created_and_finalized_by_the_controller_manager(self, cluster: controlplane.ControlPlane) -> None:
        name = unique("ns")
        cluster.kubectl("create", "namespace", name)
        cluster.kubectl("create", "configmap", "payload", "-n", name, "--from-literal=a=b")
        cluster.kubectl("delete", "namespace", name, "--wait=false")
        # The namespace controller empties it and removes the `kubernetes` finalizer.
        wait_for(lambda: not exists(cluster, "namespace", name), what=f"namespace {name} to be gone")


class TestGarbageCollection:
    def test_child_with_owner_reference_is_collected_after_its_parent(self, cluster: controlplane.ControlPlane) -> None:
        ns = unique("gc")
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("create", "configmap", "parent", "-n", ns)
        parent = json.loads(cluster.kubectl("get", "configmap", "parent", "-n", ns, "-o", "json").stdout)
        child = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "child", "namespace": ns, "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "parent",
                "uid": parent["metadata"]["uid"]}]},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(child))
        assert exists(cluster, "configmap", "child", "-n", ns)
        cluster.kubectl("delete", "configmap", "parent", "-n", ns)
        wait_for(lambda: not exists(cluster, "configmap", "child", "-n", ns), what="the child to be collected")


class TestRBAC:
    def test_user_is_forbidden_until_a_rolebinding_grants_access(self, cluster: controlplane.ControlPlane) -> None:
        ns = unique("rbac")
        cluster.kubectl("create", "namespace", ns)
        alice = kubernetes.client.CoreV1Api(cluster.api_client(cluster.mint_kubeconfig("alice", ("tenants",))))
        with pytest.raises(kubernetes.client.ApiException) as denied:
            alice.list_namespaced_config_map(ns)
        assert denied.value.status == 403
        assert 'User \\"alice\\" cannot list resource \\"configmaps\\"' in str(denied.value.body)

        cluster.kubectl("create", "role", "reader", "-n", ns, "--verb=get,list", "--resource=configmaps")
        cluster.kubectl("create", "rolebinding", "alice-reads", "-n", ns, "--role=reader", "--user=alice")
        wait_for(lambda: _allowed(lambda: alice.list_namespaced_config_map(ns)), timeout=15, what="RBAC to take effect")
        # Still nothing beyond the role: no writes.
        write = cluster.kubectl("create", "configmap", "x", "-n", ns, user="alice", check=False)
        assert write.returncode != 0 and "forbidden" in write.stderr

    def test_group_membership_comes_from_the_minted_identity(self, cluster: controlplane.ControlPlane) -> None:
        ns = unique("rbacgroup")
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("create", "rolebinding", "team-view", "-n", ns, "--clusterrole=view", "--group=team-a")
        member = cluster.kubectl("get", "pods", "-n", ns, user="bob", groups=("team-a",), check=False)
        outsider = cluster.kubectl("get", "pods", "-n", ns, user="carol", groups=("team-b",), check=False)
        assert member.returncode == 0, member.stderr
        assert outsider.returncode != 0 and "forbidden" in outsider.stderr.lower()


class TestPodSecurity:
    RESTRICTED_VIOLATION = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                                 "securityContext": {"privileged": False, "runAsUser": 0}}]},
    }
    COMPLIANT = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "compliant"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "automountServiceAccountToken": False,
            "containers": [{"name": "c", "image": "busybox", "securityContext": {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}}}],
        },
    }

    def test_restricted_namespace_rejects_a_violating_pod_and_admits_a_compliant_one(
        self, cluster: controlplane.ControlPlane
    ) -> None:
        ns = unique("psa")
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
        wait_for(lambda: exists(cluster, "serviceaccount", "default", "-n", ns), what="the default service account")

        rejected = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(self.RESTRICTED_VIOLATION), check=False)
        assert rejected.returncode != 0
        assert 'violates PodSecurity "restricted' in rejected.stderr
        assert "runAsNonRoot" in rejected.stderr or "runAsUser=0" in rejected.stderr

        admitted = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(self.COMPLIANT), check=False)
        assert admitted.returncode == 0, admitted.stderr

    def test_unlabelled_namespace_admits_the_same_pod(self, cluster: controlplane.ControlPlane) -> None:
        ns = unique("nopsa")
        cluster.kubectl("create", "namespace", ns)
        wait_for(lambda: exists(cluster, "serviceaccount", "default", "-n", ns), what="the default service account")
        admitted = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(self.RESTRICTED_VIOLATION), check=False)
        assert admitted.returncode == 0, admitted.stderr


class TestLifecycle:
    def test_stop_leaves_no_process_behind(self, tmp_path: Path, cluster: controlplane.ControlPlane) -> None:
        # A second, independent control plane (the session one keeps running).
        assert cluster.bin_dir is not None
        plane = controlplane.ControlPlane(tmp_path / "second", bin_dir=cluster.bin_dir, controller_manager=False)
        with plane:
            pids = plane.running()
            assert set(pids) == {"etcd", "kube-apiserver"}
            assert plane.kubectl("get", "namespaces").returncode == 0
        for pid in pids.values():
            assert not _alive(pid), f"process {pid} survived stop()"

    def test_children_die_with_a_killed_parent(self, tmp_path: Path, cluster: controlplane.ControlPlane) -> None:
        script = (
            "import json, sys, time\n"
            "from pathlib import Path\n"
            "from kubetune.dev import controlplane\n"
            f"plane = controlplane.ControlPlane(Path({str(tmp_path / 'orphan')!r}), bin_dir=Path({str(cluster.bin_dir)!r}),"
            " controller_manager=False)\n"
            "plane.start()\n"
            "print(json.dumps(plane.running()), flush=True)\n"
            "time.sleep(600)\n"
        )
        parent = subprocess.Popen([__import__("sys").executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert parent.stdout is not None
            pids = json.loads(parent.stdout.readline())
        finally:
            parent.kill()
            parent.wait()
        wait_for(lambda: not any(_alive(pid) for pid in pids.values()), timeout=15,
                 what="the control plane to die with its parent")

    def test_api_server_restart_keeps_the_data(self, tmp_path: Path, cluster: controlplane.ControlPlane) -> None:
        plane = controlplane.ControlPlane(tmp_path / "restart", bin_dir=cluster.bin_dir, controller_manager=False)
        with plane:
            plane.kubectl("create", "namespace", "kept")
            port = plane.ports.apiserver
            plane.restart_apiserver()
            assert plane.ports.apiserver == port
            assert plane.kubectl("get", "namespace", "kept").returncode == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _allowed(call: Callable[[], object]) -> bool:
    try:
        call()
    except kubernetes.client.ApiException as error:
        if error.status == 403:
            return False
        raise
    return True
