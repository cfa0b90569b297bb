"""Fixtures for the reliability tests: the whole product on the real control plane, broken on purpose.

`stack` is a :class:`kubetune.dev.stack.LocalStack` (control plane, CRDs, the
operator as a real subprocess, the local node running pods as processes),
one per test module. Tests kill and restart parts of it and check that what
the issue asks for still holds afterwards.

Helpers here are small and named after what they observe: the FineTuneJob,
its children, the trainer pods' processes and the progress reports the
trainer printed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import shutil
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.cli import progress_view
from kubetune.dev import stack as local_stack, tinymodel

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
MANAGED = "app.kubernetes.io/managed-by=kubetune-operator"


class Kube:
    """The API groups the reliability tests read and write, over the admin client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def plain(self, obj: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.client.sanitize_for_serialization(obj)
        return result

    def ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def ftjs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace is None:
            listing = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            listing = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return list(listing.get("items") or [])

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return ((self.ftj(namespace, name) or {}).get("status")) or {}

    def create_ftj(self, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        kwargs = {"dry_run": "All"} if dry_run else {}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                                body, **kwargs)
        return created

    def delete_ftj(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def jobs(self, namespace: str, selector: str = MANAGED) -> list[dict[str, Any]]:
        return [self.plain(j) for j in self.batch.list_namespaced_job(namespace, label_selector=selector).items]

    def deployments(self, namespace: str) -> list[dict[str, Any]]:
        return [self.plain(d) for d in self.apps.list_namespaced_deployment(namespace, label_selector=MANAGED).items]

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        return [self.plain(p) for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items]

    def events(self, namespace: str) -> list[dict[str, Any]]:
        return [self.plain(e) for e in self.core.list_namespaced_event(namespace).items]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return progress_view.condition(status, kind)


def is_true(status: dict[str, Any], kind: str) -> bool:
    return progress_view.is_true(status, kind)


def finished(status: dict[str, Any]) -> bool:
    return is_true(status, "Succeeded") or is_true(status, "Failed")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3) -> Any:
    return local_stack.wait_until(predicate, timeout, what, interval=interval)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in (nested dicts merge, anything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Tenants:
    """Creates tenant namespaces (restricted Pod Security enforced) with the tiny model and the FAQ data."""

    def __init__(self, stack: local_stack.LocalStack, kube: Kube, workdir: Path) -> None:
        self.stack = stack
        self.kube = kube
        self.workdir = workdir
        self._model: Path | None = None

    def tiny_model(self) -> Path:
        """One tiny model per stack, copied into each namespace's claim (creating it takes seconds)."""
        if self._model is None:
            self._model = self.workdir / "tiny-llama"
            corpus = [m["content"] for line in (REPO / "examples/local/kubetune-faq.jsonl").read_text().splitlines()
                      if line.strip() for m in json.loads(line)["messages"]]
            tinymodel.create_tiny_model(self._model, arch="llama", corpus=corpus)
        return self._model

    def create(self, prefix: str, *, with_data: bool = True, enforce: str = "restricted") -> str:
        namespace = f"{prefix}-{secrets.token_hex(3)}"
        self.kube.core.create_namespace({"metadata": {"name": namespace, "labels": {
            "pod-security.kubernetes.io/enforce": enforce,
            "pod-security.kubernetes.io/enforce-version": "latest"}}})
        wait_until(lambda: self.kube.core.read_namespaced_service_account("default", namespace), 30,
                   f"the default service account of {namespace}")
        if with_data:
            data = self.stack.claim_path(namespace, "datasets")
            shutil.copy(REPO / "examples/local/kubetune-faq.jsonl", data / "kubetune-faq.jsonl")
            target = self.stack.claim_path(namespace, "base-models") / "tiny-llama"
            if not target.exists():
                shutil.copytree(self.tiny_model(), target)
        return namespace


def tiny_manifest(name: str, **overrides: Any) -> dict[str, Any]:
    """examples/local/tiny.yaml named `name`, with `overrides` merged into its spec."""
    manifest = yaml.safe_load((REPO / "examples/local/tiny.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"] = deep_merge(manifest["spec"], overrides)
    return manifest


def trainer_reports(stack: local_stack.LocalStack, namespace: str) -> list[dict[str, Any]]:
    """Every progress report the trainer pods of `namespace` printed (one JSON line each), in pod order."""
    assert stack.node is not None
    found: list[dict[str, Any]] = []
    logs = sorted((stack.node.workdir / "pods").glob(f"{namespace}_*-train-*/trainer/output.log"),
                  key=lambda p: p.stat().st_mtime)
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"kind"' in line:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if isinstance(report, dict) and "seq" in report:
                    found.append(report)
    return found


def trainer_process(stack: local_stack.LocalStack, namespace: str) -> Any:
    """The running trainer container's process (the local node's Popen), or None."""
    assert stack.node is not None
    with stack.node._lock:
        runs = [r for r in stack.node.pods.values() if r.namespace == namespace and "-train-" in r.name]
    for run in runs:
        for container in run.containers:
            if container.process is not None and container.process.poll() is None:
                return container.process
    return None


def kill(process: Any) -> None:
    """SIGKILL, as a node that loses a process (OOM killer, a crash) would."""
    os.kill(process.pid, signal.SIGKILL)


def operator_peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    """The whole product, one per module: control plane, operator subprocess, local node."""
    workdir = tmp_path_factory.mktemp("reliability")
    with local_stack.LocalStack(workdir, resync_seconds=5,
                                operator_env={"KUBETUNE_STATUS_WRITE_INTERVAL": "0.5"}) as running:
        yield running


@pytest.fixture(scope="module")
def kube(stack: local_stack.LocalStack) -> Kube:
    return Kube(stack.plane.api_client())


@pytest.fixture(scope="module")
def tenants(stack: local_stack.LocalStack, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Tenants:
    return Tenants(stack, kube, tmp_path_factory.mktemp("models"))





class FaultyLink:
    """A TCP relay between the operator and the API server that tests can break.

    The operator's kubeconfig points at the relay; TLS passes through untouched
    (the API server's certificate names 127.0.0.1). `drop()` cuts every open
    connection at once, as a load balancer or a NAT table losing its state
    would: watch streams and pooled connections end mid-flight and the
    operator must reconnect.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self.drops = 0
        threading.Thread(target=self._accept, name="faulty-link", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                with self._lock:
                    self._open.discard(sock)

    def connections(self) -> int:
        """Open relayed connections (each counted once)."""
        with self._lock:
            return len(self._open) // 2

    def drop(self) -> int:
        """Resets every open connection (RST, no goodbye); returns how many there were."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
        self.drops += 1
        return len(sockets) // 2

    def kubeconfig(self, source: Path, target: Path) -> Path:
        """A copy of `source` whose server is this relay."""
        config = yaml.safe_load(source.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        target.write_text(yaml.safe_dump(config))
        target.chmod(0o600)
        return target

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.drop()
