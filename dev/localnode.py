"""A local node: runs the pods of the local control plane as local processes.

It plays both parts the local control plane lacks, the scheduler (binding
pending pods to itself when their node selector and resources fit) and the
kubelet (running containers, reporting their state through the pod status
subresource, probing readiness, honouring deletion), so the operator, the Job
and Deployment controllers and the tests see the same API traffic as on a real
cluster.

How a pod maps onto this machine:

- image -> the installed Python environment: a command starting with
  ``python``/``python3`` runs with this interpreter; any other program must be
  on PATH, or the container fails with reason ``ImageNotRunnableLocally``;
- volumes -> folders under the work directory (configMap/secret/downwardAPI
  contents written out, emptyDir a fresh folder, a persistentVolumeClaim one
  folder per namespace and claim that outlives pods), bind-mounted at their
  ``mountPath`` inside a private mount namespace (``unshare --mount``), so paths
  in args, env and config files mean what they mean in a pod; the termination
  message path is such a file too; configMap volumes are re-written when the
  ConfigMap changes (every few seconds, as a kubelet's sync does);
- network -> each pod gets its own loopback address (127.N.x.y, N random per node) as its pod IP:
  servers that bind ``$(POD_IP)`` never collide on ports, and Services'
  endpoints point at reachable addresses;
- DNS for headless Services' pods -> a pod with ``spec.subdomain`` (an Indexed Job's pods under their
  rendezvous Service) runs with its own hostname (``unshare --uts``) and its own ``/etc/hosts``, which
  holds the records cluster DNS would serve for the pods of its Job, ``<job>-<index>.<subdomain>``
  (also with ``.<namespace>.svc.cluster.local``), even before those pods start: their addresses are
  given out when first named;
- env, ``$(VAR)`` expansion, ``valueFrom`` (fieldRef, configMapKeyRef,
  secretKeyRef, resourceFieldRef) as the kubelet resolves them; a missing Secret or
  key leaves the container waiting with reason CreateContainerConfigError;
- init containers, one after another to completion, before the pod's containers.

``python -m kubetune.dev.localnode --kubeconfig FILE --workdir DIR`` runs one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as kube_config
from kubernetes import watch as k8s_watch

from kubetune.dev import orphans

log = logging.getLogger("kubetune.localnode")

NODE_NAME = "kubetune-local"
TERMINATION_MESSAGE_LIMIT = 4096
"""Bytes of a termination message the kubelet keeps."""
CONFIG_MAP_SYNC_SECONDS = 2.0
"""How often running pods' configMap volumes are brought up to date with their ConfigMaps."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class Container:
    """One running container: its process and what the kubelet reports about it."""

    name: str
    spec: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    restart_count: int = 0
    ready: bool = False
    terminated: dict[str, Any] | None = None
    termination_file: Path | None = None
    log_file: Path | None = None
    config_error: str = ""
    """Why the container's environment could not be built (a missing Secret or key): it waits with
    reason CreateContainerConfigError, as under a kubelet."""


class ContainerConfigError(Exception):
    """A container's env names a Secret or key that does not exist (the kubelet's CreateContainerConfigError)."""


@dataclasses.dataclass
class PodRun:
    """A pod this node runs."""

    namespace: str
    name: str
    uid: str
    ip: str
    folder: Path
    restart_policy: str
    containers: list[Container]
    deleting: bool = False
    finished: bool = False
    config_maps: list[tuple[dict[str, Any], Path]] = dataclasses.field(default_factory=list)
    """(configMap volume source, its folder) of the pod's plain configMap volumes, kept in sync."""
    hostname: str | None = None
    """The pod's own hostname (pods with a subdomain only; others keep the machine's)."""
    hosts_file: Path | None = None
    """The pod's /etc/hosts (pods with a subdomain only)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` escapes, unknown names stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def quantity_fits(requested: str | int | None, capacity: str | int) -> bool:
    """Whether an integer resource request (e.g. GPUs) fits the capacity."""
    if requested is None:
        return True
    try:
        return int(str(requested)) <= int(str(capacity))
    except ValueError:
        return True


class LocalNode:
    """Scheduler + kubelet for one local node. Call :meth:`run` (blocks) or :meth:`start`."""

    def __init__(self, kubeconfig: Path, workdir: Path, *, node_name: str = NODE_NAME,
                 gpus: int = 0, labels: dict[str, str] | None = None) -> None:
        self.api_client = kube_config.new_client_from_config(config_file=str(kubeconfig))
        self.core = k8s.CoreV1Api(self.api_client)
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.gpus = gpus
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                       "kubetune.io/local-node": "true", **(labels or {})}
        self.pods: dict[str, PodRun] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # A random second octet per node, so that two local stacks on one machine (parallel
        # test runs) never hand out the same pod IP; 127.0.x.x stays the host's.
        net = random.SystemRandom().randint(1, 250)
        self._ips = (f"127.{net}.{n // 250}.{n % 250 + 2}" for n in itertools.count())
        self._dns: dict[tuple[str, str, str], str] = {}
        """(namespace, subdomain, hostname) -> the address of that pod, given out when first named."""
        self._guard = orphans.ProcessGuard(self.workdir / "pods.pids")
        self._unwritten: set[str] = set()
        """Uids of pods whose latest status could not be written (API server down): retried."""

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Registers the node and starts the watch and probe loops in threads."""
        self.register()
        for target in (self._watch_loop, self._probe_loop, self._heartbeat_loop, self._status_retry_loop,
                       self._config_map_sync_loop):
            thread = threading.Thread(target=target, name=f"localnode-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def run(self) -> None:
        """Runs until SIGINT/SIGTERM, then stops every pod process."""
        self.start()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            while not self._stop.is_set():
                self._stop.wait(1)
        self.stop()

    def stop(self) -> None:
        """Stops the loops and kills every container process (the node goes away)."""
        self._stop.set()
        with self._lock:
            runs = list(self.pods.values())
        for run in runs:
            for container in run.containers:
                self._kill(container, grace=2)
        self._guard.close()

    # -- node ---------------------------------------------------------------------

    def register(self) -> None:
        """Creates (or refreshes) the Node object with capacity and a Ready condition."""
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_kib()}Ki", "pods": "110",
                    "nvidia.com/gpu": str(self.gpus)}
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.labels},
        }
        try:
            self.core.create_node(body)
        except k8s.ApiException as error:
            if error.status != 409:
                raise
        self._patch_node_status(capacity)

    def _patch_node_status(self, capacity: dict[str, str] | None = None) -> None:
        status: dict[str, Any] = {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubetune local node is running pods as local processes",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
        }
        if capacity:
            status["capacity"] = capacity
            status["allocatable"] = capacity
        self.core.patch_node_status(self.node_name, {"status": status})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(20):
            with contextlib.suppress(Exception):
                self._patch_node_status()

    def _status_retry_loop(self) -> None:
        """Writes again every pod status that could not be written, as a kubelet's status sync does:
        a container that ended while the API server was down must still reach the API."""
        while not self._stop.wait(1):
            with self._lock:
                pending = [self.pods[uid] for uid in self._unwritten if uid in self.pods]
                self._unwritten.clear()
            for run in pending:
                self._report(run)

    # -- watch --------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces()
                for pod in pods.items:
                    self._handle(self.api_client.sanitize_for_serialization(pod))
                stream = k8s_watch.Watch().stream(self.core.list_pod_for_all_namespaces,
                                                  resource_version=pods.metadata.resource_version,
                                                  timeout_seconds=60)
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    self._handle(self.api_client.sanitize_for_serialization(event["object"]),
                                 deleted=event["type"] == "DELETED")
            except Exception as error:  # the API server restarts in fault tests: keep going
                if self._stop.is_set():
                    return
                log.warning("pod watch failed (%s); retrying", error)
                time.sleep(1)

    def _handle(self, pod: dict[str, Any], deleted: bool = False) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        node = spec.get("nodeName")
        with self._lock:
            known = self.pods.get(uid)
        if deleted:
            if known:
                self._terminate(known, grace=0, then_delete=False)
            return
        if not node:
            if not meta.get("deletionTimestamp") and spec.get("schedulerName", "default-scheduler") == "default-scheduler":
                self._schedule(pod)
            return
        if node != self.node_name:
            return
        if meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds") or 0
            if known:
                if not known.deleting:
                    known.deleting = True
                    threading.Thread(target=self._terminate, args=(known, grace), daemon=True).start()
            else:
                self._delete_now(meta["namespace"], meta["name"], uid)
            return
        if known is None and pod.get("status", {}).get("phase") in (None, "Pending"):
            self._start_pod(pod)

    # -- scheduling ---------------------------------------------------------------

    def _schedule(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        reason = self._unschedulable_reason(spec)
        if reason:
            conditions = pod.get("status", {}).get("conditions") or []
            if not any(c.get("type") == "PodScheduled" and c.get("message") == reason for c in conditions):
                with contextlib.suppress(k8s.ApiException):
                    self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": {
                        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": reason, "lastTransitionTime": now()}]}})
            return
        binding = {"apiVersion": "v1", "kind": "Binding",
                   "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            # The client cannot deserialize a Binding's response; we need none.
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], binding,
                                                    _preload_content=False)
        except k8s.ApiException as error:
            if error.status not in (404, 409):
                log.warning("binding %s/%s failed: %s", meta["namespace"], meta["name"], error.reason)

    def _unschedulable_reason(self, spec: dict[str, Any]) -> str:
        for key, value in (spec.get("nodeSelector") or {}).items():
            if self.labels.get(key) != value:
                return f"0/1 nodes are available: node {self.node_name} does not match nodeSelector {key}={value}"
        gpus = 0
        for container in spec.get("containers", []):
            limits = (container.get("resources") or {}).get("limits") or {}
            requests = (container.get("resources") or {}).get("requests") or {}
            gpus += int(str(limits.get("nvidia.com/gpu") or requests.get("nvidia.com/gpu") or 0))
        if not quantity_fits(gpus, self.gpus):
            return f"0/1 nodes are available: 1 Insufficient nvidia.com/gpu (requested {gpus}, node has {self.gpus})"
        return ""

    # -- running --------------------------------------------------------------------

    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        folder = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        hostname = (spec.get("hostname") or meta["name"]) if spec.get("subdomain") else None
        with self._lock:
            if meta["uid"] in self.pods:
                return
            ip = self._address(meta["namespace"], spec["subdomain"], hostname) if hostname else next(self._ips)
            run = PodRun(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], ip=ip,
                         folder=folder, restart_policy=spec.get("restartPolicy", "Always"),
                         containers=[Container(c["name"], c) for c in spec.get("containers", [])],
                         hostname=hostname)
            self.pods[meta["uid"]] = run
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if hostname:
                run.hosts_file = folder / "etc-hosts"
                run.hosts_file.write_text(self._hosts(pod, hostname))
            volumes = self._prepare_volumes(pod, folder)
            run.config_maps = [(volume["configMap"], volumes[volume["name"]])
                               for volume in spec.get("volumes") or [] if "configMap" in volume]
            if spec.get("initContainers"):
                # Init containers run one after another, to completion, before the pod's containers.
                self._report(run)
                threading.Thread(target=self._initialise_then_start, args=(pod, run, volumes), daemon=True).start()
                return
            self._start_containers(pod, run, volumes)
        except Exception as error:  # a pod we cannot start fails like a kubelet's would
            log.exception("pod %s/%s failed to start", run.namespace, run.name)
            for container in run.containers:
                if container.process is None and container.terminated is None:
                    container.terminated = {"exitCode": 128, "reason": "StartError", "message": str(error)[:1024],
                                            "startedAt": now(), "finishedAt": now()}
        self._report(run)
        for container in run.containers:
            if container.process is not None:
                threading.Thread(target=self._wait_container, args=(pod, run, container, volumes),
                                 daemon=True).start()
        if all(c.terminated for c in run.containers):
            self._finish(run)

    def _address(self, namespace: str, subdomain: str, hostname: str) -> str:
        """The address of the pod `hostname` under `subdomain`: the same whichever pod names it first."""
        with self._lock:
            key = (namespace, subdomain, hostname)
            if key not in self._dns:
                self._dns[key] = next(self._ips)
            return self._dns[key]

    def _hosts(self, pod: dict[str, Any], hostname: str) -> str:
        """The pod's /etc/hosts: its own name, and the DNS records of its Job's pods under its subdomain."""
        meta, subdomain = pod["metadata"], pod["spec"]["subdomain"]
        namespace = meta["namespace"]
        hosts = [hostname]
        job = (meta.get("labels") or {}).get("batch.kubernetes.io/job-name")
        if job and (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") is not None:
            completions = k8s.BatchV1Api(self.api_client).read_namespaced_job(job, namespace).spec.completions or 1
            hosts += [f"{job}-{index}" for index in range(completions) if f"{job}-{index}" != hostname]
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for host in hosts:
            fqdn = f"{host}.{subdomain}.{namespace}.svc.cluster.local"
            names = [fqdn, f"{host}.{subdomain}.{namespace}.svc", f"{host}.{subdomain}.{namespace}",
                     f"{host}.{subdomain}", *([host] if host == hostname else [])]
            lines.append(f"{self._address(namespace, subdomain, host)}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def _start_containers(self, pod: dict[str, Any], run: PodRun, volumes: dict[str, Path]) -> None:
        for container in run.containers:
            try:
                self._start_container(pod, run, container, volumes)
            except ContainerConfigError as error:
                container.config_error = str(error)

    def _initialise_then_start(self, pod: dict[str, Any], run: PodRun, volumes: dict[str, Path]) -> None:
        failure = ""
        for spec in pod["spec"].get("initContainers") or []:
            init = Container(spec["name"], spec)
            try:
                self._start_container(pod, run, init, volumes)
                assert init.process is not None
                code = init.process.wait()
                self._guard.discard(init.process.pid)
            except Exception as error:  # noqa: BLE001 - reported on the pod like a kubelet would
                failure = f"init container {init.name} could not start: {error}"
                break
            if code != 0:
                failure = f"init container {init.name} exited with {code}: {_tail(init.log_file, 1024)}"
                break
            if run.deleting or self._stop.is_set():
                return
        if failure:
            for container in run.containers:
                container.terminated = {"exitCode": 128, "reason": "StartError", "message": failure[:1024],
                                        "startedAt": now(), "finishedAt": now()}
            self._finish(run)
            return
        try:
            self._start_containers(pod, run, volumes)
        except Exception as error:  # noqa: BLE001
            for container in run.containers:
                if container.process is None and container.terminated is None:
                    container.terminated = {"exitCode": 128, "reason": "StartError", "message": str(error)[:1024],
                                            "startedAt": now(), "finishedAt": now()}
        self._report(run)
        for container in run.containers:
            if container.process is not None:
                threading.Thread(target=self._wait_container, args=(pod, run, container, volumes),
                                 daemon=True).start()
        if all(c.terminated for c in run.containers):
            self._finish(run)

    def _prepare_volumes(self, pod: dict[str, Any], folder: Path) -> dict[str, Path]:
        """Writes out each volume's content; returns volume name -> host folder."""
        namespace = pod["metadata"]["namespace"]
        volumes: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                path = self.workdir / "volumes" / namespace / volume["persistentVolumeClaim"]["claimName"]
                path.mkdir(parents=True, exist_ok=True)
            else:
                path = folder / "volumes" / name
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True)
                if "configMap" in volume:
                    self._write_config_map(namespace, volume["configMap"], path)
                elif "secret" in volume:
                    self._write_secret(namespace, volume["secret"], path)
                elif "downwardAPI" in volume:
                    self._write_downward(pod, volume["downwardAPI"].get("items", []), path)
                elif "projected" in volume:
                    for source in volume["projected"].get("sources") or []:
                        if "configMap" in source:
                            self._write_config_map(namespace, source["configMap"], path)
                        elif "secret" in source:
                            self._write_secret(namespace, source["secret"], path)
                        elif "downwardAPI" in source:
                            self._write_downward(pod, source["downwardAPI"].get("items", []), path)
                        elif "serviceAccountToken" in source:
                            self._write_token(pod, source["serviceAccountToken"], path)
                elif "emptyDir" not in volume:
                    raise ValueError(f"volume {name}: only configMap, secret, downwardAPI, projected, emptyDir and "
                                     "persistentVolumeClaim volumes run on the local node")
            volumes[name] = path
        return volumes

    def _config_map_sync_loop(self) -> None:
        """Brings ConfigMap changes into running pods' configMap volumes, as a kubelet does (its sync
        takes up to about a minute; a few seconds here). Files are replaced by rename, never half-written."""
        while not self._stop.wait(CONFIG_MAP_SYNC_SECONDS):
            with self._lock:
                runs = [run for run in self.pods.values() if not run.finished and not run.deleting]
            for run in runs:
                for source, path in run.config_maps:
                    staged = path.parent / f".{path.name}.sync"
                    try:
                        if staged.exists():
                            shutil.rmtree(staged)
                        staged.mkdir(parents=True)
                        self._write_config_map(run.namespace, source, staged)
                        for file in staged.rglob("*"):
                            if file.is_file():
                                target = path / file.relative_to(staged)
                                if not target.is_file() or target.read_bytes() != file.read_bytes():
                                    target.parent.mkdir(parents=True, exist_ok=True)
                                    file.replace(target)
                    except Exception:  # noqa: BLE001 - the API server may be away; the next sync retries
                        log.debug("syncing configMap volume %s of %s/%s failed", path, run.namespace, run.name,
                                  exc_info=True)
                    finally:
                        shutil.rmtree(staged, ignore_errors=True)

    def _write_items(self, data: dict[str, bytes], items: list[dict[str, Any]] | None, path: Path) -> None:
        chosen = [(item["key"], item["path"]) for item in items] if items else [(key, key) for key in data]
        for key, relative in chosen:
            if key not in data:
                raise ValueError(f"key {key!r} not found")
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])

    def _write_config_map(self, namespace: str, source: dict[str, Any], path: Path) -> None:
        try:
            config_map = self.core.read_namespaced_config_map(source["name"], namespace)
        except k8s.ApiException as error:
            if error.status == 404 and source.get("optional"):
                return
            raise ValueError(f"configmap {namespace}/{source['name']} not found") from error
        data = {k: v.encode() for k, v in (config_map.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (config_map.binary_data or {}).items()})
        self._write_items(data, source.get("items"), path)

    def _write_secret(self, namespace: str, source: dict[str, Any], path: Path) -> None:
        name = source.get("secretName") or source.get("name")
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except k8s.ApiException as error:
            if error.status == 404 and source.get("optional"):
                return
            raise ValueError(f"secret {namespace}/{name} not found") from error
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        self._write_items(data, source.get("items"), path)

    def _write_downward(self, pod: dict[str, Any], items: list[dict[str, Any]], path: Path) -> None:
        for item in items:
            value = self._field_ref(pod, item["fieldRef"]["fieldPath"]) if "fieldRef" in item else ""
            (path / item["path"]).write_text(value)

    def _write_token(self, pod: dict[str, Any], source: dict[str, Any], path: Path) -> None:
        meta = pod["metadata"]
        request = {"spec": {"audiences": [source["audience"]] if source.get("audience") else None,
                            "expirationSeconds": source.get("expirationSeconds", 3600),
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                               "uid": meta["uid"]}}}
        token = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"], request)
        (path / source["path"]).write_text(token.status.token)

    def _field_ref(self, pod: dict[str, Any], field_path: str) -> str:
        meta = pod["metadata"]
        with self._lock:
            run = self.pods.get(meta["uid"])
        values = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name, "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.podIP": run.ip if run else "", "status.hostIP": "127.0.0.1",
        }
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        return values.get(field_path, "")

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.core.read_namespaced_config_map(source["configMapRef"]["name"], namespace).data or {}
                env.update({prefix + k: v for k, v in data.items()})
            if "secretRef" in source:
                data = self.core.read_namespaced_secret(source["secretRef"]["name"], namespace).data or {}
                env.update({prefix + k: base64.b64decode(v).decode() for k, v in data.items()})
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                env[var["name"]] = self._field_ref(pod, ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref:
                key = ref["secretKeyRef"]
                try:
                    secret = self.core.read_namespaced_secret(key["name"], namespace)
                except k8s.ApiException as error:
                    if error.status == 404 and not key.get("optional"):
                        raise ContainerConfigError(f'secret "{key["name"]}" not found') from None
                    if error.status != 404:
                        raise
                    continue
                if key["key"] not in (secret.data or {}):
                    if key.get("optional"):
                        continue
                    raise ContainerConfigError(f"couldn't find key {key['key']} in Secret {namespace}/{key['name']}")
                env[var["name"]] = base64.b64decode((secret.data or {})[key["key"]]).decode()
            elif "configMapKeyRef" in ref:
                key = ref["configMapKeyRef"]
                env[var["name"]] = (self.core.read_namespaced_config_map(key["name"], namespace).data or {})[key["key"]]
            elif "resourceFieldRef" in ref:
                resources = container.get("resources") or {}
                field = ref["resourceFieldRef"]["resource"]
                kind, _, name = field.partition(".")
                env[var["name"]] = str((resources.get(kind) or {}).get(name, ""))
        return env

    def _start_container(self, pod: dict[str, Any], run: PodRun, container: Container,
                         volumes: dict[str, Path]) -> None:
        spec = container.spec
        env = self._container_env(pod, spec)
        command = [expand(part, env) for part in (spec.get("command") or []) + (spec.get("args") or [])]
        if not command:
            raise ValueError(f"container {container.name}: no command; the local node cannot run an image's "
                             "default entrypoint")
        program = command[0]
        if program in ("python", "python3", "python3.11"):
            command[0] = sys.executable
        elif shutil.which(program) is None:
            raise ValueError(f"container {container.name}: image {spec.get('image')!r} runs {program!r}, which is "
                             "not installed here (ImageNotRunnableLocally)")
        mounts: list[tuple[Path, str, bool]] = []
        for mount in spec.get("volumeMounts") or []:
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        container_dir = run.folder / container.name
        container_dir.mkdir(parents=True, exist_ok=True)
        termination = container_dir / "termination-log"
        termination.write_text("")
        mounts.append((termination, spec.get("terminationMessagePath", "/dev/termination-log"), False))
        if run.hosts_file is not None:
            mounts.append((run.hosts_file, "/etc/hosts", True))
        script = container_dir / "start.sh"
        script.write_text(_mount_script(mounts, spec.get("workingDir"), self.workdir, hostname=run.hostname))
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(container_dir),
                    "HOSTNAME": run.hostname or run.name, "PYTHONUNBUFFERED": "1",
                    "KUBERNETES_SERVICE_HOST": "", **env}
        container.log_file = container_dir / "output.log"
        container.termination_file = termination
        output = open(container.log_file, "ab")
        namespaces = ["--mount", "--propagation", "private", *(["--uts"] if run.hostname else [])]
        container.process = subprocess.Popen(
            ["unshare", *namespaces, "--", "/bin/sh", str(script), *command],
            env=full_env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=orphans.die_with_parent,
        )
        output.close()
        self._guard.add(container.process.pid)
        container.started_at = now()
        container.terminated = None
        container.ready = not spec.get("readinessProbe")

    def _wait_container(self, pod: dict[str, Any], run: PodRun, container: Container,
                        volumes: dict[str, Path]) -> None:
        while True:
            process = container.process
            assert process is not None
            code = process.wait()
            self._guard.discard(process.pid)
            message = ""
            if container.termination_file and container.termination_file.exists():
                message = container.termination_file.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
            if not message and code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = _tail(container.log_file, TERMINATION_MESSAGE_LIMIT)
            exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N
            container.terminated = {"exitCode": exit_code, "reason": "Completed" if code == 0 else "Error",
                                    "message": message, "startedAt": container.started_at, "finishedAt": now()}
            container.ready = False
            restart = (run.restart_policy == "Always" or (run.restart_policy == "OnFailure" and code != 0))
            if restart and not run.deleting and not self._stop.is_set():
                self._report(run)
                time.sleep(min(10, 2 ** container.restart_count))
                if run.deleting or self._stop.is_set():
                    break
                container.restart_count += 1
                try:
                    self._start_container(pod, run, container, volumes)
                except Exception as error:
                    container.terminated = {"exitCode": 128, "reason": "StartError", "message": str(error)[:1024],
                                            "startedAt": now(), "finishedAt": now()}
                    break
                self._report(run)
                continue
            break
        if all(c.terminated for c in run.containers):
            self._finish(run)
        else:
            self._report(run)

    def _finish(self, run: PodRun) -> None:
        run.finished = True
        if not run.deleting:
            self._report(run)

    # -- status ---------------------------------------------------------------------

    def _report(self, run: PodRun) -> None:
        """Writes the pod's status as a kubelet would."""
        statuses = []
        for container in run.containers:
            if container.terminated:
                state: dict[str, Any] = {"terminated": container.terminated}
            elif container.process is not None:
                state = {"running": {"startedAt": container.started_at}}
            elif container.config_error:
                state = {"waiting": {"reason": "CreateContainerConfigError", "message": container.config_error}}
            else:
                state = {"waiting": {"reason": "ContainerCreating"}}
            statuses.append({"name": container.name, "image": container.spec.get("image", ""),
                             "imageID": "", "ready": container.ready, "started": container.terminated is None,
                             "restartCount": container.restart_count, "state": state})
        terminated = [c.terminated for c in run.containers if c.terminated]
        if run.finished and len(terminated) == len(run.containers) and run.restart_policy != "Always":
            phase = "Succeeded" if all(t["exitCode"] == 0 for t in terminated) else "Failed"
        else:
            phase = "Running" if any(c.process is not None for c in run.containers) else "Pending"
        ready = phase == "Running" and all(c.ready for c in run.containers)
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": str(ready)},
            {"type": "Ready", "status": str(ready)},
        ]
        for condition in conditions:
            condition["lastTransitionTime"] = now()
        status = {"phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                  "podIP": run.ip, "podIPs": [{"ip": run.ip}], "startTime": run.containers[0].started_at or now(),
                  "containerStatuses": statuses, "conditions": conditions}
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
        except k8s.ApiException as error:
            if error.status == 404:
                return
            log.warning("status of %s/%s not written: %s", run.namespace, run.name, error.reason)
            self._retry_report(run)
        except Exception as error:  # API server down: the status retry loop writes it
            log.warning("status of %s/%s not written: %s", run.namespace, run.name, error)
            self._retry_report(run)

    def _retry_report(self, run: PodRun) -> None:
        with self._lock:
            if run.uid in self.pods:
                self._unwritten.add(run.uid)

    # -- probes -----------------------------------------------------------------------

    def _probe_loop(self) -> None:
        last: dict[tuple[str, str], float] = {}
        while not self._stop.wait(0.5):
            with self._lock:
                runs = [r for r in self.pods.values() if not r.deleting and not r.finished]
            for run in runs:
                changed = False
                for container in run.containers:
                    probe = container.spec.get("readinessProbe")
                    if not probe or container.process is None or container.terminated:
                        continue
                    key = (run.uid, container.name)
                    period = float(probe.get("periodSeconds", 10))
                    if time.monotonic() - last.get(key, 0.0) < min(period, 2.0 if not container.ready else period):
                        continue
                    last[key] = time.monotonic()
                    ok = self._probe(run, container, probe)
                    if ok != container.ready:
                        container.ready = ok
                        changed = True
                if changed:
                    self._report(run)

    def _probe(self, run: PodRun, container: Container, probe: dict[str, Any]) -> bool:
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = _resolve_port(get.get("port"), container.spec)
            url = f"{get.get('scheme', 'HTTP').lower()}://{run.ip}:{port}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=float(probe.get("timeoutSeconds", 1))) as response:
                    return bool(200 <= response.status < 400)
            except (urllib.error.URLError, OSError, ValueError):
                return False
        if "exec" in probe:
            return subprocess.run(probe["exec"]["command"], capture_output=True).returncode == 0
        if "tcpSocket" in probe:
            import socket

            port = _resolve_port(probe["tcpSocket"].get("port"), container.spec)
            with contextlib.suppress(OSError), socket.create_connection((run.ip, port), timeout=1):
                return True
            return False
        return True

    # -- deletion -----------------------------------------------------------------------

    def _kill(self, container: Container, grace: float) -> None:
        process = container.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=max(grace, 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _terminate(self, run: PodRun, grace: float, then_delete: bool = True) -> None:
        run.deleting = True
        for container in run.containers:
            self._kill(container, grace)
        # The waiter threads record the exit; give them a moment, then report once.
        for _ in range(50):
            if all(c.terminated or c.process is None for c in run.containers):
                break
            time.sleep(0.05)
        with self._lock:
            self.pods.pop(run.uid, None)
        if then_delete:
            run.finished = True
            self._report(run)
            self._delete_now(run.namespace, run.name, run.uid)

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(k8s.ApiException):
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0,
                                            body={"preconditions": {"uid": uid}, "gracePeriodSeconds": 0})

    # -- introspection (tests, the CLI) ------------------------------------------------

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path | None:
        """The output file of a pod's container that this node ran (the newest if several)."""
        matches = sorted((self.workdir / "pods").glob(f"{namespace}_{name}_*/{container or '*'}/output.log"),
                         key=lambda p: p.stat().st_mtime)
        return matches[-1] if matches else None

    def running_processes(self) -> list[int]:
        """Pids of container processes still running."""
        with self._lock:
            return [c.process.pid for r in self.pods.values() for c in r.containers
                    if c.process is not None and c.process.poll() is None]


STAGE = "/run/kubetune-localnode"
"""Where the node's work directory is bind-mounted first inside each pod's mount namespace: volume
sources are taken from there, so a volume mounted over their host path (an emptyDir at /tmp while
the work directory lives under /tmp) cannot hide them."""

KEEP = "/run/kubetune-localnode-keep"
"""Where the "image" (this Python environment and kubetune's source) is staged before the volumes
are mounted, to be bound back if a volume hides it: a pod's emptyDir at /tmp must not hide a
checkout or virtual environment that lives under /tmp, as a container's image never is."""


def image_paths() -> list[Path]:
    """What a pod's "image" is made of here: the interpreter's environments and kubetune's source."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent.parent}
    return sorted(p.resolve() for p in paths if p.exists())


def _under(path: str, mount: str) -> bool:
    mount = mount.rstrip("/") or "/"
    return path != mount and path.startswith(mount + "/")


def _mount_script(mounts: list[tuple[Path, str, bool]], working_dir: str | None, workdir: Path,
                  keep: list[Path] | None = None, hostname: str | None = None) -> str:
    """A shell script run inside the new mount namespace: bind each volume, set the pod's hostname (in its
    own UTS namespace) when it has one, then exec the command."""
    keep = image_paths() if keep is None else keep
    hidden = [p for p in keep if any(_under(str(p), target) or str(p) == target.rstrip("/") for _, target, _ in mounts)]
    lines = ["set -e", f"mkdir -p {STAGE}", f"mount --bind {shlex.quote(str(workdir))} {STAGE}"]
    for index, path in enumerate(hidden):
        lines.append(f"mkdir -p {KEEP}/{index}; mount --bind {shlex.quote(str(path))} {KEEP}/{index}")
    # Parents before children, so a volume at /a/b is not hidden by a later one at /a.
    for source, target, read_only in sorted(mounts, key=lambda m: m[1].rstrip("/").count("/")):
        staged = Path(STAGE) / source.relative_to(workdir)
        quoted_source, quoted_target = shlex.quote(str(staged)), shlex.quote(target)
        if source.is_dir():
            lines.append(f"mkdir -p {quoted_target}")
        else:
            lines.append(f"mkdir -p \"$(dirname {quoted_target})\"; [ -e {quoted_target} ] || : > {quoted_target}")
        lines.append(f"mount --bind {quoted_source} {quoted_target}")
        if read_only:
            lines.append(f"mount -o remount,bind,ro {quoted_target}")
    for index, path in enumerate(hidden):
        quoted = shlex.quote(str(path))
        lines.append(f"mkdir -p {quoted}; mount --bind {KEEP}/{index} {quoted}")
    if hostname:
        lines.append(f"printf %s {shlex.quote(hostname)} > /proc/sys/kernel/hostname")
    if working_dir:
        lines.append(f"mkdir -p {shlex.quote(working_dir)}; cd {shlex.quote(working_dir)}")
    lines.append('exec "$@"')
    return "\n".join(lines) + "\n"


def _resolve_port(port: Any, container: dict[str, Any]) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"unknown port {port!r}")


def _tail(path: Path | None, limit: int) -> str:
    if path is None or not path.exists():
        return ""
    data = path.read_bytes()[-limit:]
    return data.decode(errors="replace")


def _memory_kib() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 8 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.dev.localnode", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--node-name", default=NODE_NAME)
    parser.add_argument("--gpus", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localnode %(levelname)s %(message)s")
    LocalNode(args.kubeconfig, args.workdir, node_name=args.node_name, gpus=args.gpus).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
