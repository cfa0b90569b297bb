"""A real Kubernetes control plane on loopback, for tests and local mode.

Starts etcd, kube-apiserver and kube-controller-manager (built from Go modules
by ``hack/controlplane/build.sh``) as child processes with random free ports:

- TLS everywhere on the API server, with a CA of our own that also signs client
  certificates, so :meth:`ControlPlane.mint_kubeconfig` can hand out a
  kubeconfig for any user and groups at run time;
- static token authentication for the admin (group ``system:masters``);
- ``--authorization-mode=RBAC`` and the Pod Security admission plugin;
- a controller-manager for garbage collection, namespaces, Jobs, service
  accounts and Deployments (there is no scheduler and no kubelet: the local node
  of the dev tooling or the tests play the kubelet's part).

Every child dies with the Python process that started it (a
:class:`kubetune.dev.orphans.ProcessGuard`), and :meth:`ControlPlane.stop` (also
on context exit and at interpreter exit) terminates them, so no process
outlives a failed or killed test run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import yaml

from kubetune.dev import orphans

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "hack" / "controlplane" / "build.sh"

ADMIN_USER = "kubetune-admin"
SERVICE_CIDR = "10.96.0.0/16"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or did not become ready."""


@dataclasses.dataclass(frozen=True)
class Ports:
    """Loopback ports of one control plane; kept across restarts of a component."""

    etcd_client: int
    """etcd's client port (the API server's storage)."""
    etcd_peer: int
    """etcd's peer port (unused by others, but etcd must bind one)."""
    apiserver: int
    """kube-apiserver's secure port."""
    controller_manager: int
    """kube-controller-manager's secure (health/metrics) port."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


def build_binaries() -> Path:
    """Builds (or finds in the cache) the control-plane binaries; returns their folder."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"building the control plane failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr}")


class Certificates:
    """A CA plus the certificates and keys the control plane needs, made with openssl."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_crt = folder / "ca.crt"
        self.ca_key = folder / "ca.key"
        self.sa_key = folder / "sa.key"
        self.sa_pub = folder / "sa.pub"
        self.serving_crt = folder / "apiserver.crt"
        self.serving_key = folder / "apiserver.key"
        if not self.ca_crt.exists():
            self._create()

    def _create(self) -> None:
        cwd = self.folder
        _openssl("genrsa", "-out", "ca.key", "2048", cwd=cwd)
        _openssl("req", "-x509", "-new", "-nodes", "-key", "ca.key", "-sha256", "-days", "3650",
                 "-subj", "/CN=kubetune-local-ca", "-out", "ca.crt", cwd=cwd)
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=cwd)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=cwd)
        san = "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc"
        self._sign("apiserver", "/CN=kube-apiserver", extensions=[san, "extendedKeyUsage=serverAuth"])

    def _sign(self, name: str, subject: str, extensions: list[str]) -> tuple[Path, Path]:
        cwd = self.folder
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=cwd)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=cwd)
        ext_file = cwd / f"{name}.ext"
        ext_file.write_text("\n".join(extensions) + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", ext_file.name,
                 "-out", f"{name}.crt", cwd=cwd)
        return cwd / f"{name}.crt", cwd / f"{name}.key"

    def client_certificate(self, user: str, groups: tuple[str, ...]) -> tuple[Path, Path]:
        """A client certificate: CN is the user name, each O a group (Kubernetes' x509 rules)."""
        subject = f"/CN={user}" + "".join(f"/O={group}" for group in groups)
        safe = "client-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in user + "-" + "-".join(groups))
        return self._sign(safe, subject, extensions=["extendedKeyUsage=clientAuth"])


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback.

    Use as a context manager. ``workdir`` holds etcd's data, certificates,
    kubeconfigs and one log file per component (read them when a test fails).
    """

    def __init__(self, workdir: Path, *, controller_manager: bool = True,
                 bin_dir: Path | None = None, ready_timeout: float = 90.0,
                 extra_admission_plugins: tuple[str, ...] = (), audit_policy: str | None = None) -> None:
        """`extra_admission_plugins` are enabled besides the default set (e.g.
        ``OwnerReferencesPermissionEnforcement``, as OpenShift runs it); `audit_policy` (an
        audit.k8s.io/v1 Policy as YAML) turns on the audit log at :attr:`audit_log` (JSON lines)."""
        self.workdir = workdir.resolve()
        self.extra_admission_plugins = tuple(extra_admission_plugins)
        self.audit_policy = audit_policy
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.with_controller_manager = controller_manager
        self.bin_dir = bin_dir
        self.ready_timeout = ready_timeout
        self.ports = Ports(free_port(), free_port(), free_port(), free_port())
        self.admin_token = secrets.token_hex(24)
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._guard = orphans.ProcessGuard(self.workdir / "children.pids")
        self.certs: Certificates | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def start(self) -> None:
        """Builds or finds the binaries, then starts every component and waits until ready."""
        started = time.monotonic()
        if self.bin_dir is None:
            self.bin_dir = build_binaries()
        self.certs = Certificates(self.workdir / "pki")
        (self.workdir / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )
        self._write_kubeconfig(self.kubeconfig, user=ADMIN_USER, token=self.admin_token)
        atexit.register(self.stop)
        try:
            self.start_etcd()
            self.start_apiserver()
            if self.with_controller_manager:
                self.start_controller_manager()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Terminates every component (SIGTERM, then SIGKILL after 10 s); idempotent."""
        for name in reversed(list(self._procs)):
            self._stop_process(name)
        self._guard.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def _stop_process(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._guard.discard(proc.pid)
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        self._logs[name] = log
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir, preexec_fn=orphans.die_with_parent)
        self._procs[name] = proc
        self._guard.add(proc.pid)
        return proc

    def _binary(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    def _wait(self, name: str, probe: Any, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}; see {self.log_tail(name)}")
            if probe():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} did not become {what} in {self.ready_timeout:.0f}s; {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines of a component's log, for error messages."""
        path = self.workdir / f"{name}.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {path})"
        return f"last lines of {path}:\n" + "\n".join(tail)

    # -- components ----------------------------------------------------------

    def start_etcd(self) -> None:
        """Starts etcd with its data under workdir/etcd (kept across restarts)."""
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        self._spawn("etcd", [
            self._binary("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--log-level=warn",
            # A test cluster trades durability on power loss for speed.
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296",
        ])
        self._wait("etcd", lambda: _http_ok(f"{client}/health"), "healthy")

    def start_apiserver(self) -> None:
        """Starts kube-apiserver and waits for /readyz."""
        certs = self.certs
        assert certs is not None
        self._spawn("kube-apiserver", [
            self._binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            # Loopback cannot be a `kubernetes` Service endpoint; nothing here needs one.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.ports.apiserver}",
            f"--tls-cert-file={certs.serving_crt}", f"--tls-private-key-file={certs.serving_key}",
            f"--client-ca-file={certs.ca_crt}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,"
            "ResourceQuota,DefaultStorageClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
            "ValidatingAdmissionPolicy" + "".join(f",{plugin}" for plugin in self.extra_admission_plugins),
            *self._audit_args(),
            f"--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={certs.sa_pub}",
            f"--service-account-signing-key-file={certs.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=false",
            "--profiling=false",
            "--v=1",
        ])
        self._wait("kube-apiserver", self._apiserver_ready, "ready")

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (one JSON event per line) when `audit_policy` was given."""
        return self.workdir / "audit.log"

    def _audit_args(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(self.audit_policy)
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                "--audit-log-mode=blocking"]

    def _apiserver_ready(self) -> bool:
        return _http_ok(f"{self.server}/readyz", token=self.admin_token, ca=self.certs.ca_crt if self.certs else None)

    def start_controller_manager(self) -> None:
        """Starts kube-controller-manager (GC, namespaces, Jobs, Deployments, service accounts)."""
        certs = self.certs
        assert certs is not None
        self._spawn("kube-controller-manager", [
            self._binary("kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports.controller_manager}",
            "--leader-elect=false",
            f"--service-account-private-key-file={certs.sa_key}",
            f"--root-ca-file={certs.ca_crt}",
            "--use-service-account-credentials=false",
            # Cloud and node-lifecycle controllers have nothing to manage here.
            "--controllers=*,-nodeipam,-nodelifecycle,"
            "-persistentvolume-binder,-attachdetach,-persistentvolume-expander,-ttl",
            f"--cluster-signing-cert-file={certs.ca_crt}", f"--cluster-signing-key-file={certs.ca_key}",
            "--concurrent-gc-syncs=5",
            "--v=1",
        ])
        self._wait("kube-controller-manager", self._controller_manager_healthy, "healthy")

    def _controller_manager_healthy(self) -> bool:
        return _http_ok(f"https://127.0.0.1:{self.ports.controller_manager}/healthz", insecure=True)

    def restart_apiserver(self) -> None:
        """Stops and starts kube-apiserver on the same port; etcd keeps its data."""
        self._stop_process("kube-apiserver")
        self.start_apiserver()

    def running(self) -> dict[str, int]:
        """Pids of the components that are running."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    # -- clients ---------------------------------------------------------------

    def _write_kubeconfig(self, path: Path, *, user: str, token: str | None = None,
                          cert: Path | None = None, key: Path | None = None) -> None:
        assert self.certs is not None
        credentials: dict[str, str] = {}
        if token is not None:
            credentials["token"] = token
        if cert is not None and key is not None:
            credentials["client-certificate"] = str(cert)
            credentials["client-key"] = str(key)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubetune-local", "cluster": {
                "server": self.server, "certificate-authority": str(self.certs.ca_crt)}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": user}}],
            "current-context": "kubetune-local",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def mint_kubeconfig(self, user: str, groups: tuple[str, ...] | list[str] = ()) -> Path:
        """A kubeconfig that authenticates as ``user`` in ``groups`` (a client certificate)."""
        assert self.certs is not None
        cert, key = self.certs.client_certificate(user, tuple(groups))
        path = self.workdir / f"{cert.stem}.kubeconfig"
        self._write_kubeconfig(path, user=user, cert=cert, key=key)
        return path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, user: str | None = None,
                groups: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this control plane.

        ``user``/``groups`` run it as that identity (a minted client certificate);
        ``check`` raises with kubectl's stderr on a non-zero exit.
        """
        if user is not None:
            kubeconfig = self.mint_kubeconfig(user, groups)
        config = kubeconfig or self.kubeconfig
        proc = subprocess.run([self._binary("kubectl"), f"--kubeconfig={config}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin (or for another kubeconfig)."""
        from kubernetes import config as kube_config

        return kube_config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def env(self) -> dict[str, str]:
        """Environment for a child process that should talk to this control plane."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}


def _http_ok(url: str, *, token: str | None = None, ca: Path | None = None, insecure: bool = False) -> bool:
    """True when a GET of ``url`` answers 200."""
    context: ssl.SSLContext | None = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m kubetune.dev.controlplane [WORKDIR]`: start one and wait for Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    workdir = Path(argv[0]) if argv else Path(".work/controlplane")
    with ControlPlane(workdir) as plane:
        print(json.dumps({"server": plane.server, "kubeconfig": str(plane.kubeconfig),
                          "startupSeconds": round(plane.startup_seconds, 1)}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
