"""A real S3-compatible object store on loopback: SeaweedFS (`weed server -s3`), for tests and local mode.

The `weed` binary is built from its Go module by ``hack/seaweedfs/build.sh`` into
a content-keyed cache, the same way the control plane is. One process runs the
master, a volume server, the filer and the S3 gateway, each on a random free
port, with its data in a temporary folder; the S3 gateway checks signatures
against one identity (`access_key`/`secret_key`), so wrong credentials are
refused as a real store would refuse them. ``stop()`` (or leaving the ``with``
block) ends the process; the orphan guard ends it too if the test process dies.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune.dev.controlplane import REPO_ROOT
from kubetune.dev.loopback import LoopbackServer

BUILD_SCRIPT = REPO_ROOT / "hack" / "seaweedfs" / "build.sh"


class ObjectStoreError(RuntimeError):
    """The object store could not be built or started."""


def build_weed() -> Path:
    """Builds (or finds in the cache) the `weed` binary; returns its path."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ObjectStoreError(f"building SeaweedFS failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]) / "weed"


def _free_port(avoid: set[int]) -> int:
    """A free loopback port whose +10000 (SeaweedFS's gRPC port for it) is free too."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in avoid or port + 10000 in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        avoid.update({port, port + 10000})
        return port


class SeaweedS3(LoopbackServer):
    """`weed server -s3` on loopback with one access key; `endpoint` is the S3 URL."""

    log_name = "seaweedfs.log"
    error = ObjectStoreError

    def __init__(self, workdir: Path, *, ready_timeout: float = 120.0) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout, pids_name="seaweedfs.pids")
        self.access_key = "kt" + secrets.token_hex(8)
        """The one identity's access key id."""
        self.secret_key = secrets.token_hex(20)
        """Its secret key (random per run, so a test can look for it in logs and objects)."""
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self) -> None:
        weed = build_weed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kubetune-test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        used: set[int] = set()
        self.ports = {name: _free_port(used) for name in ("master", "volume", "filer", "s3")}
        args = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
                f"-filer.port={self.ports['filer']}", "-filer", "-s3", f"-s3.port={self.ports['s3']}",
                f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=100",
                "-metricsPort=0"]
        self.start_process(args, self._s3_answers, what="SeaweedFS S3", poll_seconds=0.3)

    def _s3_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous listing: the gateway is up and checks credentials
        except OSError:
            return False
        return True

    def filesystem(self) -> Any:
        """An s3fs filesystem with this store's credentials (for the tests' own setup and checks)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def create_bucket(self, name: str) -> None:
        fs = self.filesystem()
        deadline = time.monotonic() + 60
        while True:  # the filer may still be registering its volume servers
            try:
                fs.mkdir(name)
                return
            except FileExistsError:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def env(self) -> dict[str, str]:
        """The variables a pod gets from `spec.credentials.s3` for this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}
