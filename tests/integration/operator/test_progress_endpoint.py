"""The progress-report endpoint as trainer pods and attackers meet it: real sockets, a real operator
process over HTTPS with a certificate its own CA issued, real FineTuneJobs on the API server.

What must hold: a body that arrives in pieces is read whole; what a caller
without the job's token sends is refused before its fields are looked at, and
deep nesting is a 400, never a 500; one job cannot flood the endpoint (429
with Retry-After, other jobs unaffected); trainer pods verify the endpoint's
certificate before they send their token; the metrics, which name every
tenant's jobs, are not on the port trainer pods reach; a slow API call for one
job holds up no other job.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import config as trainer_config
from kubetune.operator import client as operator_client, metrics as metrics_module
from kubetune.operator.progress import reports, server as progress
from kubetune.operator.settings import OperatorSettings
from kubetune.trainer.reporting import Reporter

from .conftest import Kube, OperatorProcess, finetunejob, wait_for

BURST = 5
"""The TLS operator's per-job burst; its rate is 1 report per second."""


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
                      ) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed, for `hosts` and `ips` (openssl); (ca.crt, tls.crt, tls.key)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=test-progress-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr",
            "-subj", f"/CN={hosts[0]}")
    alt_names = ",".join([f"DNS:{h}" for h in hosts] + [f"IP:{i}" for i in ips])
    (folder / "ext.cnf").write_text(f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf")
    return folder / "ca.crt", folder / "tls.crt", folder / "tls.key"


@dataclass
class TlsOperator:
    process: OperatorProcess
    ca: str
    """The CA's PEM, as trainer pods get it."""

    @property
    def url(self) -> str:
        return f"https://localhost:{self.process.port}/v1/reports"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.process.metrics_port}/metrics"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca)

    def post(self, body: bytes, token: str | None) -> tuple[int, dict[str, Any], Any]:
        """(status, headers, JSON answer) of one POST over verified HTTPS."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context()) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read() or b"null")


@pytest.fixture(scope="module")
def tls_operator(cluster: Any, finetunejob_crd: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[TlsOperator]:
    """The operator as a process, its report port on HTTPS, 1 report/s per job after a burst of 5."""
    ca, cert, key = make_certificates(tmp_path_factory.mktemp("progress-tls"))
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("tls-operator"))
    process.env.update({
        "KUBETUNE_TLS_CERT_FILE": str(cert), "KUBETUNE_TLS_KEY_FILE": str(key),
        "KUBETUNE_PROGRESS_CA": ca.read_text(),
        "KUBETUNE_PROGRESS_URL": f"https://localhost:{process.port}/v1/reports",
        "KUBETUNE_REPORT_RATE": "1", "KUBETUNE_REPORT_BURST": str(BURST),
    })
    process.start()
    yield TlsOperator(process, ca.read_text())
    process.stop()


@dataclass
class Job:
    namespace: str
    name: str
    uid: str
    token: str

    def report(self, seq: int, **fields: Any) -> dict[str, Any]:
        return {"job": {"namespace": self.namespace, "name": self.name, "uid": self.uid}, "attempt": 0,
                "seq": seq, "kind": "progress", "time": datetime.now(timezone.utc).isoformat(), **fields}

    def identity(self) -> trainer_config.JobIdentity:
        return trainer_config.JobIdentity(namespace=self.namespace, name=self.name, uid=self.uid)


def create_job(kube: Kube, namespace: str, name: str, secret_key: str) -> Job:
    created = kube.create_ftj(namespace, finetunejob(name, suspend=True))
    key = reports.JobKey(namespace, name, created["metadata"]["uid"])
    return Job(namespace, name, key.uid, reports.job_token(secret_key.encode(), key))


def raw_post(operator: TlsOperator, body: bytes, token: str, pieces: int, pause: float) -> tuple[int, bytes]:
    """POSTs over a raw TLS socket, the body written in `pieces` separate sends `pause` seconds apart."""
    with socket.create_connection(("127.0.0.1", operator.process.port), timeout=15) as plain:
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with operator.context().wrap_socket(plain, server_hostname="localhost") as sock:
            sock.sendall((f"POST /v1/reports HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
                          f"Connection: close\r\n\r\n").encode())
            size = -(-len(body) // pieces)
            for start in range(0, len(body), size):
                time.sleep(pause)
                sock.sendall(body[start:start + size])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


class TestReading:
    def test_a_body_split_across_tcp_writes_is_read_whole(self, tls_operator: TlsOperator, kube: Kube,
                                                          namespace: str) -> None:
        job = create_job(kube, namespace, "split-body", tls_operator.process.secret_key)
        body = json.dumps(job.report(1, step=4, totalSteps=10, message="x" * 3000)).encode()

        status, payload = raw_post(tls_operator, body, job.token, pieces=4, pause=0.3)

        assert (status, json.loads(payload)) == (202, {"accepted": True})
        wait_for(lambda: (kube.ftj(namespace, job.name).get("status") or {}).get("progress", {}).get("step") == 4,
                 "the split report's step in status")


class TestAuthenticationFirst:
    def test_deep_nesting_is_a_400_not_a_500_with_or_without_a_token(self, tls_operator: TlsOperator, kube: Kube,
                                                                    namespace: str) -> None:
        job = create_job(kube, namespace, "deep", tls_operator.process.secret_key)
        deep = {**job.report(1), "results": json.loads("[" * 40 + "]" * 40)}

        for body, token in ((b"[" * 60_000, None), (json.dumps(deep).encode(), job.token)):
            status, _, answer = tls_operator.post(body, token)
            assert (status, answer["error"]) == (400, "Malformed"), answer
            assert "more than 16 deep" in answer["message"]

    def test_fields_are_checked_only_for_the_holder_of_the_jobs_token(self, tls_operator: TlsOperator, kube: Kube,
                                                                       namespace: str) -> None:
        job = create_job(kube, namespace, "victim", tls_operator.process.secret_key)
        other = create_job(kube, namespace, "other", tls_operator.process.secret_key)
        malformed = json.dumps(job.report(1, step="many", kind="explode")).encode()

        without, _, answer_without = tls_operator.post(malformed, None)
        wrong, _, answer_wrong = tls_operator.post(malformed, other.token)
        right, _, answer_right = tls_operator.post(malformed, job.token)

        assert (without, wrong, right) == (401, 403, 400)
        assert "step" not in answer_without["message"] and "step" not in answer_wrong["message"]
        assert "step: must be an integer" in answer_right["message"]


class TestRateLimit:
    def test_a_flooding_job_gets_429_with_retry_after_and_other_jobs_do_not(self, tls_operator: TlsOperator,
                                                                           kube: Kube, namespace: str) -> None:
        flooder = create_job(kube, namespace, "flooder", tls_operator.process.secret_key)
        neighbour = create_job(kube, namespace, "neighbour", tls_operator.process.secret_key)

        answers = [tls_operator.post(json.dumps(flooder.report(seq, step=seq)).encode(), flooder.token)
                   for seq in range(1, BURST + 3)]
        neighbour_status, _, _ = tls_operator.post(json.dumps(neighbour.report(1)).encode(), neighbour.token)

        statuses = [status for status, _, _ in answers]
        assert statuses[:BURST] == [202] * BURST
        assert 429 in statuses[BURST:], statuses
        limited = next(a for a in answers if a[0] == 429)
        assert limited[2]["error"] == "RateLimited" and int(limited[1]["Retry-After"]) >= 1
        assert neighbour_status == 202
        time.sleep(int(limited[1]["Retry-After"]) + 0.2)
        assert tls_operator.post(json.dumps(flooder.report(100)).encode(), flooder.token)[0] == 202

    def test_the_trainer_waits_out_a_429_and_loses_no_report(self, tls_operator: TlsOperator, kube: Kube,
                                                            namespace: str) -> None:
        job = create_job(kube, namespace, "eager", tls_operator.process.secret_key)
        reporter = Reporter(job.identity(), url=tls_operator.url, token=job.token, ca=tls_operator.ca,
                            stream=open("/dev/null", "w"))
        for step in range(1, BURST + 3):
            reporter.report("progress", step=step, totalSteps=BURST + 2)
        reporter.close(timeout=30)

        assert reporter.failed_posts == 0
        wait_for(lambda: kube.ftj(namespace, job.name)["status"]["progress"]["step"] == BURST + 2,
                 "the last report, sent after a 429, in status")


class TestTls:
    def test_the_trainer_verifies_the_endpoint_with_the_ca_it_was_given(self, tls_operator: TlsOperator,
                                                                       kube: Kube, namespace: str,
                                                                       tmp_path: Path) -> None:
        job = create_job(kube, namespace, "verified", tls_operator.process.secret_key)
        stranger_ca, _, _ = make_certificates(tmp_path / "stranger")

        impostor_check = Reporter(job.identity(), url=tls_operator.url, token=job.token,
                                  ca=stranger_ca.read_text(), stream=open("/dev/null", "w"))
        impostor_check.report("progress", step=9, totalSteps=10)
        impostor_check.close()
        trusted = Reporter(job.identity(), url=tls_operator.url, token=job.token, ca=tls_operator.ca,
                           stream=open("/dev/null", "w"))
        trusted.report("progress", step=3, totalSteps=10)
        trusted.close()

        assert impostor_check.failed_posts == 1, "a certificate from another CA must not be trusted"
        assert trusted.failed_posts == 0
        wait_for(lambda: kube.ftj(namespace, job.name)["status"]["progress"]["step"] == 3, "step 3 in status")

    def test_plain_http_to_the_tls_port_carries_no_report(self, tls_operator: TlsOperator) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{tls_operator.process.port}/v1/reports", data=b"{}",
                                         method="POST")
        with pytest.raises(OSError) as caught:  # the TLS handshake fails: no HTTP answer at all
            urllib.request.urlopen(request, timeout=10)
        assert not isinstance(caught.value, urllib.error.HTTPError)


class TestMetricsPort:
    def test_metrics_are_not_on_the_report_port_and_are_on_the_metrics_port(self, tls_operator: TlsOperator,
                                                                           kube: Kube, namespace: str) -> None:
        job = create_job(kube, namespace, "metered", tls_operator.process.secret_key)
        assert tls_operator.post(json.dumps(job.report(1, trainLoss=1.5)).encode(), job.token)[0] == 202

        request = urllib.request.Request(f"https://localhost:{tls_operator.process.port}/metrics")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10, context=tls_operator.context())
        with urllib.request.urlopen(tls_operator.metrics_url, timeout=10) as response:
            exposition = response.read().decode()

        assert caught.value.code == 404
        assert f'kubetune_job_train_loss{{name="metered",namespace="{namespace}"}} 1.5' in exposition


class TestNoSharedLock:
    def test_a_slow_api_call_for_one_job_does_not_hold_up_another(self, cluster: Any, kube: Kube,
                                                                  finetunejob_crd: None, namespace: str) -> None:
        secret = "in-process-key"
        slow_job = create_job(kube, namespace, "slow", secret)
        quick_job = create_job(kube, namespace, "quick", secret)
        api = operator_client.KubeClient(cluster.api_client())
        settings = OperatorSettings(secret_key=secret.encode(), status_write_interval=0.0)

        async def scenario() -> tuple[bool, bool]:
            release = asyncio.Event()

            async def get_job(namespace: str, name: str) -> dict[str, Any] | None:
                if name == slow_job.name:  # the API server is slow to answer for this one job
                    await release.wait()
                return await asyncio.to_thread(api.get_finetunejob, namespace, name)

            async def patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
                await asyncio.to_thread(api.patch_status, namespace, name, status)

            service = progress.ProgressService(settings, metrics_module.OperatorMetrics(), get_job, patch_status)

            def parsed(job: Job) -> reports.Report:
                return reports.parse_report(json.dumps(job.report(1, step=2, totalSteps=4)).encode(), 65536)

            slow = asyncio.ensure_future(service.accept(parsed(slow_job)))
            await asyncio.sleep(0.2)
            quick_done = False
            try:
                await asyncio.wait_for(service.accept(parsed(quick_job)), timeout=20)
                quick_done = True
            except TimeoutError:
                pass
            slow_pending = not slow.done()
            release.set()
            await asyncio.wait_for(slow, timeout=20)
            return quick_done, slow_pending

        quick_done, slow_pending = asyncio.run(scenario())

        assert slow_pending, "the slow job's report was still waiting on its API call"
        assert quick_done, "another job's report waited for the slow job's API call"
        assert kube.ftj(namespace, "quick")["status"]["progress"]["step"] == 2
        assert kube.ftj(namespace, "slow")["status"]["progress"]["step"] == 2
