"""Hostile data, hostile progress reports, and secrets that must stay secret, on the whole product.

- Bad datasets (binary, wrong encoding, missing fields, one enormous line,
  nothing left after cleaning, a label outside the label set) each end
  `Failed` with reason `InvalidDataset` and a message saying what is wrong,
  from the dataset-validation pod, before any trainer Job exists.
- Progress reports that are malformed, oversized, replayed or forged (another
  job's token, a token for a recreated job) are rejected with the right HTTP
  status and change nothing in the job's status.
- No Secret value (the jobs' progress tokens, the operator's signing key)
  appears in any FineTuneJob status, Event, the operator's log, a pod's log,
  the ConfigMaps or the metrics; every pod ran in a namespace that enforces the
  `restricted` Pod Security level.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

import pytest

from kubetune.dev import stack as local_stack
from tests.reliability.conftest import Kube, Tenants, condition, is_true, tiny_manifest, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAQ_LINE = {"messages": [{"role": "user", "content": "What is kubetune?"},
                         {"role": "assistant", "content": "An operator that fine-tunes models."}]}
ENORMOUS_CHARS = 6 * 1024 * 1024


def bad_datasets() -> dict[str, tuple[bytes, dict[str, Any], str]]:
    """name -> (file content, spec overrides, a word the failure message must contain)."""
    good = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                     {"role": "assistant", "content": f"answer {i}"}]}) for i in range(20)]
    classified = [json.dumps({"text": f"ticket {i}", "label": ["billing", "outage"][i % 2]}) for i in range(20)]
    return {
        "binary": (bytes(range(256)) * 64, {}, "UTF-8"),
        "latin1": ("\n".join(good[:10] + ['{"messages": [{"role": "user", "content": "caf\u00e9"}]}']).encode("latin-1"),
                   {}, "UTF-8"),
        "no-messages": ("\n".join(good[:5] + [json.dumps({"text": "no messages field"})]).encode(), {}, "messages"),
        "enormous": ("\n".join(good[:5] + [json.dumps({"messages": [
            {"role": "user", "content": "x" * ENORMOUS_CHARS}, {"role": "assistant", "content": "y"}]})]).encode(),
            {}, "line 6"),
        "all-empty": ("\n".join(json.dumps({"messages": [{"role": "user", "content": " "},
                                                         {"role": "assistant", "content": "  "}]})
                                for _ in range(20)).encode(), {}, "no records left after cleaning"),
        # json.loads raises RecursionError / ValueError (not JSONDecodeError) for these: they must still
        # end InvalidDataset naming the line, not a retried crash.
        "deeply-nested": ("\n".join(good[:5] + ['{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}"]).encode(),
                          {}, "line 6"),
        "huge-integer": ("\n".join(good[:5] + ['{"messages": ' + "7" * 5000 + "}"]).encode(), {}, "line 6"),
        "unknown-label": ("\n".join(classified + [json.dumps({"text": "odd one", "label": "sales"})]).encode(),
                          {"dataset": {"format": "classification", "labels": ["billing", "outage"]}}, "sales"),
    }


def token_of(kube: Kube, namespace: str, name: str) -> str:
    secret = kube.core.read_namespaced_secret(f"{name}-progress", namespace)
    return base64.b64decode(secret.data["token"]).decode()


def post(stack: local_stack.LocalStack, body: bytes, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{stack.operator_url}/v1/reports", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def report(job: dict[str, Any], seq: int, **fields: Any) -> dict[str, Any]:
    meta = job["metadata"]
    return {"job": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}, "attempt": 0,
            "seq": seq, "kind": "progress", "time": datetime.now(timezone.utc).isoformat(), **fields}


class TestBadDatasets:
    def test_each_ends_failed_with_invalid_dataset_before_training(self, stack: local_stack.LocalStack, kube: Kube,
                                                                   tenants: Tenants) -> None:
        namespace = tenants.create("bad-data")
        cases = bad_datasets()
        for name, (content, overrides, _) in cases.items():
            stack.claim_path(namespace, "datasets").joinpath(f"{name}.jsonl").write_bytes(content)
            spec = {"dataset": {"train": {"source": f"pvc://datasets/{name}.jsonl"}}, "serving": {"enabled": False}}
            manifest = tiny_manifest(name, **spec)
            manifest["spec"]["dataset"].update(overrides.get("dataset", {}))
            kube.create_ftj(namespace, manifest)
        statuses = wait_until(lambda: (s := {n: kube.status(namespace, n) for n in cases})
                              and all(is_true(x, "Failed") for x in s.values()) and s, 300, "every bad dataset to fail")
        for name, status in statuses.items():
            failed = condition(status, "Failed")
            assert failed["reason"] == "InvalidDataset", (name, failed)
            assert cases[name][2] in failed["message"], (name, failed["message"])
            assert len(failed["message"]) <= 1024
            assert condition(status, "Validated")["status"] == "False"
        trainer_jobs = [j for j in kube.jobs(namespace) if j["metadata"]["labels"]["app.kubernetes.io/component"]
                        == "trainer"]
        assert trainer_jobs == [], "no GPU is ever held for a bad dataset"


class TestHostileReports:
    def test_rejected_with_the_right_status_and_no_harm_done(self, stack: local_stack.LocalStack, kube: Kube,
                                                            tenants: Tenants) -> None:
        namespace = tenants.create("reports")
        other_namespace = tenants.create("reports-other")
        for ns, name in ((namespace, "victim"), (other_namespace, "attacker")):
            kube.create_ftj(ns, tiny_manifest(name, suspend=True, serving={"enabled": False}))
        wait_until(lambda: kube.core.read_namespaced_secret("victim-progress", namespace), 60, "victim's token")
        wait_until(lambda: kube.core.read_namespaced_secret("attacker-progress", other_namespace), 60, "attacker's")
        victim = kube.ftj(namespace, "victim")
        attacker = kube.ftj(other_namespace, "attacker")
        assert victim is not None and attacker is not None
        token, foreign = token_of(kube, namespace, "victim"), token_of(kube, other_namespace, "attacker")

        assert post(stack, json.dumps(report(victim, 5, step=7, totalSteps=100)).encode(), token) == 202
        wait_until(lambda: (kube.status(namespace, "victim").get("progress") or {}).get("step") == 7, 30,
                   "the genuine report in status")
        hostile = {
            "forged: another namespace's job token": (report(victim, 6, step=99), foreign, 403),
            "forged: no token": (report(victim, 6, step=99), None, 401),
            "forged: the token of a job in a report naming the victim's uid under the attacker's name":
                ({**report(victim, 6, step=99), "job": {**report(victim, 6)["job"], "name": "attacker",
                                                        "namespace": other_namespace}}, foreign, 403),
            "recreated job (old uid)": ({**report(victim, 6, step=99), "job": {
                **report(victim, 6)["job"], "uid": "00000000-0000-0000-0000-000000000000"}}, token, 403),
            "replayed seq": (report(victim, 5, step=99), token, 409),
            "older seq": (report(victim, 4, step=99), token, 409),
            "stale attempt": ({**report(victim, 50, step=99), "attempt": -1}, token, 400),
            "NaN loss": (None, token, 400),
            "unknown kind": ({**report(victim, 7, step=99), "kind": "rm -rf"}, token, 400),
            "negative step": (report(victim, 8, step=-5), token, 400),
            "time without zone": ({**report(victim, 9, step=99), "time": "2026-01-01T00:00:00"}, token, 400),
            "wrong types": ({**report(victim, 10), "step": "99", "results": {"f1": "high"}}, token, 400),
        }
        for what, (body, presented, expected) in hostile.items():
            raw = b'{"job": {}, "trainLoss": NaN}' if body is None else json.dumps(body).encode()
            assert post(stack, raw, presented) == expected, what
        assert post(stack, b"\xff\xfe not json", token) == 400
        assert post(stack, b"[1, 2, 3]", token) == 400
        assert post(stack, b"{" + b'"pad": "' + b"a" * (1024 * 1024) + b'"}', token) == 413
        assert post(stack, json.dumps({**report(victim, 11, step=8), "message": "m" * 70000}).encode(), token) == 413
        assert post(stack, json.dumps(report(victim, 12, step=8)).encode(), token) == 202, "genuine reports still work"
        status = wait_until(lambda: (s := kube.status(namespace, "victim")) and s.get("progress", {}).get("step") == 8
                            and s, 30, "the next genuine report")
        assert status["progress"]["step"] == 8, "no hostile report reached the status"
        assert (kube.status(other_namespace, "attacker").get("progress") or {}).get("step") is None
        assert stack.operator is not None and stack.operator.poll() is None


class TestSecretsStaySecret:
    def test_no_secret_value_in_status_events_logs_configmaps_or_metrics(self, stack: local_stack.LocalStack,
                                                                         kube: Kube, tenants: Tenants) -> None:
        namespace = tenants.create("secrets")
        kube.create_ftj(namespace, tiny_manifest("trained", hyperparameters={"epochs": 1}))
        wait_until(lambda: is_true(kube.status(namespace, "trained"), "ServingReady"), 300, "the job to be served")
        assert stack.node is not None
        secrets = {stack.secret_key}
        for ns in {j["metadata"]["namespace"] for j in kube.ftjs()}:
            for job in kube.ftjs(ns):
                try:
                    secrets.add(token_of(kube, ns, job["metadata"]["name"]))
                except Exception:  # noqa: BLE001 - jobs that never got a token (InvalidSpec) have none
                    pass
        assert len(secrets) > 3
        places = {
            "FineTuneJob statuses": json.dumps([j.get("status") for j in kube.ftjs()]),
            "events": json.dumps([e for ns in {j["metadata"]["namespace"] for j in kube.ftjs()}
                                  for e in kube.events(ns)]),
            "configmaps": json.dumps([kube.plain(c) for c in kube.core.list_config_map_for_all_namespaces().items]),
            "operator log": (stack.workdir / "operator.log").read_text(errors="replace"),
            "pod logs": "\n".join(p.read_text(errors="replace")
                                  for p in (stack.node.workdir / "pods").glob("*/*/output.log")),
            "metrics": urllib.request.urlopen(f"{stack.metrics_url}/metrics", timeout=10).read().decode(),
        }
        for place, text in places.items():
            assert text, f"nothing read from {place}"
            for secret in secrets:
                assert secret not in text, f"a secret value appears in the {place}"
        pods = kube.pods(namespace)
        kinds = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
        assert {"validation", "trainer", "serving"} <= kinds, kinds
        labels = kube.core.read_namespace(namespace).metadata.labels
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", "every pod above was admitted as restricted"
        for pod in pods:
            assert pod["spec"].get("automountServiceAccountToken") is False
            for container in pod["spec"]["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
