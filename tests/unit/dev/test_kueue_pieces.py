"""The Kueue fixture's pieces that need no running cluster: its certificates, the webhooks it registers,
the Configuration it writes."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev import controlplane, kueue

MANIFESTS = """\
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}}
  rules: [{apiGroups: [batch], apiVersions: [v1], operations: [CREATE], resources: [jobs]}]
- name: mpod.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate--v1-pod}}
  rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: validating-webhook-configuration}
webhooks:
- name: vworkload.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /validate-kueue-x-k8s-io-v1beta2-workload}}
  rules: [{apiGroups: [kueue.x-k8s.io], apiVersions: [v1beta2], operations: [CREATE], resources: [workloads]}]
- name: vdeployment.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /validate-apps-v1-deployment}}
  rules: [{apiGroups: [apps], apiVersions: [v1], operations: [CREATE], resources: [deployments]}]
"""


def fixture(tmp_path: Path) -> kueue.Kueue:
    plane = controlplane.ControlPlane(tmp_path / "plane")
    made = kueue.Kueue(tmp_path / "kueue", plane)
    made.ports = {"webhook": 40001, "health": 40002, "metrics": 40003}
    return made


def test_the_serving_certificate_is_for_loopback_and_signed_by_the_fixtures_ca(tmp_path: Path) -> None:
    ca, crt, key = kueue.make_certificates(tmp_path)
    text = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text and "TLS Web Server Authentication" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(crt)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert key.exists()


def test_only_the_webhooks_for_jobs_and_kueues_kinds_are_registered_by_url_with_the_ca(tmp_path: Path) -> None:
    made = fixture(tmp_path)
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(MANIFESTS)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n")
    docs = made.webhook_configurations(manifests, ca)
    by_kind: dict[str, dict[str, Any]] = {doc["kind"]: doc for doc in docs}
    assert {doc["metadata"]["name"] for doc in docs} == set(made.webhook_names.values())
    mutating = by_kind["MutatingWebhookConfiguration"]["webhooks"]
    validating = by_kind["ValidatingWebhookConfiguration"]["webhooks"]
    assert [hook["name"] for hook in mutating] == ["mjob.kb.io"], "a Pod webhook nobody serves would refuse every Pod"
    assert [hook["name"] for hook in validating] == ["vworkload.kb.io"]
    assert mutating[0]["clientConfig"] == {"url": "https://127.0.0.1:40001/mutate-batch-v1-job",
                                           "caBundle": base64.b64encode(ca.read_bytes()).decode()}


def test_the_configuration_manages_only_queued_jobs_on_loopback_ports(tmp_path: Path) -> None:
    config = fixture(tmp_path).configuration()
    assert config["apiVersion"] == "config.kueue.x-k8s.io/v1beta2"
    assert config["manageJobsWithoutQueueName"] is False
    assert config["integrations"] == {"frameworks": ["batch/job"]}
    assert config["internalCertManagement"] == {"enable": False}
    assert config["health"]["healthProbeBindAddress"] == "127.0.0.1:40002"
    assert config["metrics"]["bindAddress"] == "127.0.0.1:40003"
    assert (config["webhook"]["host"], config["webhook"]["port"]) == ("127.0.0.1", 40001)
    yaml.safe_dump(config)  # what start() writes


def test_the_mount_script_overlays_etc_on_a_tmpfs_and_puts_the_metrics_certificate_at_kueues_path(
        tmp_path: Path) -> None:
    script = kueue._mount_script(tmp_path / "etc overlay", tmp_path / "certs")
    lines = script.splitlines()
    assert lines[0] == "set -e" and lines[-1] == 'exec "$@"'
    assert f"mount -t tmpfs tmpfs '{tmp_path}/etc overlay'" in lines
    assert any(line.startswith("mount -t overlay overlay -o lowerdir=/etc,") and line.endswith(" /etc")
               for line in lines)
    assert f"mkdir -p {kueue.METRICS_CERT_DIR}" in lines
