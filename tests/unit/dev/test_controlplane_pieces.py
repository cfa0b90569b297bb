"""The control-plane launcher's pieces that need no running cluster."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import yaml

from kubetune.dev import controlplane


class TestCertificates:
    def test_client_certificate_carries_user_and_groups_signed_by_the_ca(self, tmp_path: Path) -> None:
        certs = controlplane.Certificates(tmp_path)
        cert, key = certs.client_certificate("alice", ("team-a", "team-b"))
        subject = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253"],
                                 capture_output=True, text=True, check=True).stdout
        assert "CN=alice" in subject and "O=team-a" in subject and "O=team-b" in subject
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_crt), str(cert)],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
        assert key.exists()

    def test_serving_certificate_is_valid_for_loopback(self, tmp_path: Path) -> None:
        certs = controlplane.Certificates(tmp_path)
        text = subprocess.run(["openssl", "x509", "-in", str(certs.serving_crt), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout
        assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text

    def test_existing_pki_is_reused_not_regenerated(self, tmp_path: Path) -> None:
        first = controlplane.Certificates(tmp_path).ca_crt.read_bytes()
        assert controlplane.Certificates(tmp_path).ca_crt.read_bytes() == first


class TestKubeconfig:
    def test_admin_kubeconfig_points_at_the_server_with_the_ca(self, tmp_path: Path) -> None:
        plane = controlplane.ControlPlane(tmp_path, bin_dir=tmp_path)
        plane.certs = controlplane.Certificates(tmp_path / "pki")
        plane._write_kubeconfig(plane.kubeconfig, user="admin", token="secret-token")
        config = yaml.safe_load(plane.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        assert cluster["server"] == f"https://127.0.0.1:{plane.ports.apiserver}"
        assert Path(cluster["certificate-authority"]).read_bytes() == plane.certs.ca_crt.read_bytes()
        assert config["users"][0]["user"] == {"token": "secret-token"}
        assert plane.kubeconfig.stat().st_mode & 0o077 == 0, "kubeconfig must not be readable by others"


def test_free_port_is_bindable() -> None:
    port = controlplane.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
