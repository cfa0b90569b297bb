"""A real Kueue on loopback: its controller manager against the test control plane, for the tests that
run the operator's trainer Jobs through Kueue's queues.

The `kueue` binary is built from its Go module by ``hack/kueue/build.sh`` into a content-keyed cache,
the same way the control plane and SeaweedFS are; that script copies the CRDs and the webhook
configurations of the same module version next to the binary. :class:`Kueue`:

- installs Kueue's CRDs into the control plane;
- writes a Kueue ``Configuration`` (config.kueue.x-k8s.io/v1beta2): only Jobs that name a queue are
  managed (``manageJobsWithoutQueueName: false``), the one integration is ``batch/job``, no leader
  election, health, metrics and webhook servers on free loopback ports;
- makes a CA and a serving certificate for 127.0.0.1 with openssl (Kueue's internal certificate
  management writes a Secret and names a Service, neither of which can reach a process on this host),
  and registers the webhooks Kueue serves for Jobs and its own kinds with a URL clientConfig
  (``https://127.0.0.1:<port>/...``) and that CA;
- runs Kueue and waits until ``/readyz`` answers and a dry-run create passes through its webhooks.

Kueue reads its metrics serving certificate from a fixed path (``/etc/kueue/metrics/certs``) when
its internal certificate management is off. The process therefore runs in a private mount namespace
(``unshare --mount``, as the local node's pods do) with an overlay on ``/etc`` whose upper layer is a
tmpfs: the certificate appears at that path for Kueue alone, and nothing on the host changes.

``stop()`` (or leaving the ``with`` block) removes the webhook configurations first, so that Jobs
created later in the same control plane are not sent to a server that is gone, then ends the
process; the orphan guard ends it if the test process dies.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev.controlplane import REPO_ROOT, ControlPlane, KubectlError, free_port
from kubetune.dev.loopback import LoopbackServer

BUILD_SCRIPT = REPO_ROOT / "hack" / "kueue" / "build.sh"

WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
"""The API groups whose webhooks are registered: Jobs (the one integration enabled) and Kueue's own
kinds. The manifests also name Pods, Deployments and a dozen other frameworks' kinds; Kueue serves
none of those paths with only ``batch/job`` enabled, and a registered webhook nobody serves would
refuse every Pod of the control plane."""

METRICS_CERT_DIR = "/etc/kueue/metrics/certs"
"""Where Kueue v0.17 reads its metrics certificate when internal certificate management is off."""


class KueueError(RuntimeError):
    """Kueue could not be built, installed or started."""


def build_kueue() -> Path:
    """Builds (or finds in the cache) Kueue; returns the cache folder (bin/kueue, crds/, webhook/)."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KueueError(f"building Kueue failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]).parent


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KueueError(f"openssl {' '.join(args)} failed: {proc.stderr}")


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA of its own and a serving certificate for 127.0.0.1 it signs: (ca.crt, tls.crt, tls.key)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=kubetune-test-kueue-ca", cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
             "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "tls.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", "tls.ext", "-out", "tls.crt", cwd=folder)
    return folder / "ca.crt", folder / "tls.crt", folder / "tls.key"


class Kueue(LoopbackServer):
    """Kueue's controller manager on loopback against `plane`; `version` is the built module version."""

    log_name = "kueue.log"
    error = KueueError

    def __init__(self, workdir: Path, plane: ControlPlane, *, ready_timeout: float = 120.0) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout, pids_name="kueue.pids")
        self.plane = plane
        self.ports: dict[str, int] = {}
        self.version = ""
        suffix = secrets.token_hex(3)
        self.webhook_names = {"MutatingWebhookConfiguration": f"kubetune-test-kueue-mutating-{suffix}",
                              "ValidatingWebhookConfiguration": f"kubetune-test-kueue-validating-{suffix}"}
        """The webhook configurations this instance registers (and removes on stop)."""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cache = build_kueue()
        self.version = (cache / "VERSION").read_text().strip()
        self.install_crds(cache / "crds")
        ca, _, _ = make_certificates(self.workdir / "certs")
        self.ports = {name: free_port() for name in ("webhook", "health", "metrics")}
        config = self.workdir / "kueue-config.yaml"
        config.write_text(yaml.safe_dump(self.configuration(), sort_keys=False))
        script = self.workdir / "run-kueue.sh"
        script.write_text(_mount_script(self.workdir / "etc-overlay", self.workdir / "certs"))
        args = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", str(script),
                str(cache / "bin" / "kueue"), f"--config={config}", f"--kubeconfig={self.plane.kubeconfig}",
                "--zap-log-level=2"]
        self.start_process(args, self._ready, what="Kueue", poll_seconds=0.3)
        try:
            self.register_webhooks(cache / "webhook" / "manifests.yaml", ca)
            self._wait_for_webhooks()
        except BaseException:
            self.stop()
            raise

    def configuration(self) -> dict[str, Any]:
        """Kueue's Configuration for this instance (the file passed with --config)."""
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "manageJobsWithoutQueueName": False,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['metrics']}"},
            "webhook": {"host": "127.0.0.1", "port": self.ports["webhook"], "certDir": str(self.workdir / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
            # The on-demand visibility API server would listen on 0.0.0.0:8082 and collide with a
            # second instance; nothing here reads it.
            "featureGates": {"VisibilityOnDemand": False},
        }

    def install_crds(self, folder: Path) -> None:
        """Applies Kueue's CRDs with only their storage version (v1beta2) served: the manifests route
        v1beta1 through Kueue's conversion webhook, which needs a Service; serving v1beta1 without it
        would hand a v1beta1 client unconverted objects, so it is refused instead."""
        files = sorted(folder.glob("*.yaml"))
        if not files:
            raise KueueError(f"no Kueue CRDs in {folder}")
        names: list[str] = []
        for path in files:
            crd = _crd(path)
            for version in crd["spec"]["versions"]:
                version["served"] = bool(version.get("storage"))
            crd["spec"].pop("conversion", None)
            names.append(str(crd["metadata"]["name"]))
            self.plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd),
                               timeout=120)
        self.plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in names))

    def webhook_configurations(self, manifests: Path, ca: Path) -> list[dict[str, Any]]:
        """Kueue's webhook configurations for Jobs and Kueue's kinds, pointed at this process."""
        bundle = base64.b64encode(ca.read_bytes()).decode()
        found: list[dict[str, Any]] = []
        for doc in yaml.safe_load_all(manifests.read_text()):
            if not doc or doc.get("kind") not in self.webhook_names:
                continue
            hooks = [hook for hook in doc.get("webhooks") or []
                     if {group for rule in hook.get("rules") or [] for group in rule["apiGroups"]} <= WEBHOOK_GROUPS]
            for hook in hooks:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.ports['webhook']}{path}", "caBundle": bundle}
            found.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                          "metadata": {"name": self.webhook_names[doc["kind"]]}, "webhooks": hooks})
        if len(found) != 2 or not all(doc["webhooks"] for doc in found):
            raise KueueError(f"{manifests} lacks the mutating or validating webhooks for Jobs and Kueue's kinds")
        return found

    def register_webhooks(self, manifests: Path, ca: Path) -> None:
        for doc in self.webhook_configurations(manifests, ca):
            self.plane.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def _wait_for_webhooks(self) -> None:
        """A dry-run create of a ResourceFlavor passes through Kueue's mutating and validating webhooks:
        it succeeds only once the API server reaches them over TLS with the registered CA."""
        probe = json.dumps({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                            "metadata": {"name": "kubetune-webhook-probe"}})
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                self.plane.kubectl("create", "--dry-run=server", "-f", "-", input=probe)
                return
            except KubectlError as error:
                if time.monotonic() > deadline:
                    raise KueueError(f"Kueue's webhooks did not answer in {self.ready_timeout:.0f}s: "
                                     f"{error.stderr}\n{self.log_tail()}") from error
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Removes the webhook configurations, then ends Kueue; idempotent."""
        for kind, name in self.webhook_names.items():
            try:
                self.plane.kubectl("delete", kind.lower(), name, "--ignore-not-found", timeout=30)
            except (KubectlError, subprocess.TimeoutExpired, OSError):
                pass  # the control plane is already gone: nothing calls the webhooks any more
        super().stop()


def _mount_script(overlay: Path, certs: Path) -> str:
    """A shell script run inside Kueue's private mount namespace: an overlay on /etc whose writes go to
    a tmpfs, the metrics certificate bound at Kueue's fixed path, then exec Kueue."""
    overlay.mkdir(parents=True, exist_ok=True)
    over, key, crt = (shlex.quote(str(p)) for p in (overlay, certs / "tls.key", certs / "tls.crt"))
    return "\n".join([
        "set -e",
        f"mount -t tmpfs tmpfs {over}",
        f"mkdir -p {over}/upper {over}/work",
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={over}/upper,workdir={over}/work /etc",
        f"mkdir -p {METRICS_CERT_DIR}",
        f"cp {crt} {key} {METRICS_CERT_DIR}/",
        'exec "$@"',
    ]) + "\n"


def _crd(path: Path) -> dict[str, Any]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            return dict(doc)
    raise KueueError(f"{path} holds no CustomResourceDefinition")
