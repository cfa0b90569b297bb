"""The operator on the real control plane: a FineTuneJob becomes training and its status stays true.

The operator runs as a real process (`python -m kubetune.operator`); the test
plays the kubelet by patching pod status; the real Job controller, garbage
collector and Pod Security admission do their parts.
"""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.integration.operator.conftest import Kube, OperatorProcess, finetunejob, wait_for

TRAIN, VALIDATE, CONFIG, SECRET = "{}-train", "{}-validate", "{}-config", "{}-progress"


def token_of(kube: Kube, namespace: str, name: str) -> str:
    secret = kube.core.read_namespaced_secret(SECRET.format(name), namespace)
    return base64.b64decode(secret.data["token"]).decode()


def report(job: dict[str, Any], seq: int, kind: str, attempt: int = 0, **fields: Any) -> dict[str, Any]:
    metadata = job["metadata"]
    return {"job": {"namespace": metadata["namespace"], "name": metadata["name"], "uid": metadata["uid"]},
            "attempt": attempt, "seq": seq, "kind": kind,
            "time": datetime.now(timezone.utc).isoformat(), **fields}


def pass_validation(kube: Kube, namespace: str, name: str) -> None:
    wait_for(lambda: kube.job(namespace, VALIDATE.format(name)), "the validation Job")
    kube.run_pod_to_end(namespace, VALIDATE.format(name), 0, json.dumps({"outcome": "validated",
                                                                         "message": "120 train examples"}))
    wait_for(lambda: kube.job(namespace, TRAIN.format(name)), "the trainer Job")


def metric(text: str, series: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(series + "{") and not line.startswith(series + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_happy_path_to_succeeded_with_status_filled_and_metrics(kube: Kube, operator: OperatorProcess,
                                                                namespace: str) -> None:
    created = kube.create_ftj(namespace, finetunejob("happy"))
    wait_for(lambda: kube.job(namespace, "happy-validate"), "the validation Job")
    # Every child is owned by the FineTuneJob.
    for child in (kube.job(namespace, "happy-validate"),
                  kube.plain(kube.core.read_namespaced_config_map("happy-config", namespace)),
                  kube.plain(kube.core.read_namespaced_secret("happy-progress", namespace))):
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    validation_pod = wait_for(lambda: kube.live_pod(namespace, "happy-validate"), "the validation pod")
    assert "nvidia.com/gpu" not in json.dumps(validation_pod["spec"]["containers"][0]["resources"])
    assert kube.job(namespace, "happy-train") is None, "no GPU is held before the dataset is validated"
    kube.set_pod_running(namespace, validation_pod)
    kube.set_pod_finished(namespace, validation_pod, 0, json.dumps({"message": "120 train examples"}))
    wait_for(lambda: kube.job(namespace, "happy-train"), "the trainer Job")
    assert kube.condition_is(namespace, "happy", "Validated", "True", "DatasetValid")

    pod = wait_for(lambda: kube.live_pod(namespace, "happy-train"), "the trainer pod")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    kube.set_pod_running(namespace, pod)
    wait_for(lambda: kube.condition_is(namespace, "happy", "Running", "True", "Training"), "Running=True")
    job = kube.ftj(namespace, "happy")
    token = token_of(kube, namespace, "happy")
    reports = [
        report(job, 1, "started", totalSteps=100),
        report(job, 2, "progress", step=40, totalSteps=100, epoch=0.4, trainLoss=2.5, learningRate=1e-4,
               tokensSeen=40960, tokensPerSecond=2048.0, etaSeconds=30.0),
        report(job, 3, "checkpoint", step=50, totalSteps=100, valLoss=2.25,
               checkpoint={"step": 50, "path": "/mnt/pvc/models/finetunes/happy/checkpoints/step-50",
                           "valLoss": 2.25}),
        report(job, 4, "evaluation", step=100, totalSteps=100, trainLoss=1.75, valLoss=2.0, valPerplexity=7.39,
               tokensSeen=102400),
    ]
    for sent in reports:
        assert operator.post_report(sent, token)[0] == 202
    time.sleep(1.5)  # the pod runs for a while: accelerator-seconds accrue
    # The last push ("completed") is lost: the termination message finishes the status.
    summary = {"outcome": "succeeded", "step": 100, "valLoss": 2.0, "results": {"perplexity": 7.1,
               "tokenAccuracy": 0.41}, "modelDigest": "sha256:" + "ab" * 32, "message": "trained 100 steps",
               "tokensProcessed": 102400}
    kube.set_pod_finished(namespace, pod, 0, json.dumps(summary))
    wait_for(lambda: kube.condition_is(namespace, "happy", "Succeeded", "True", "TrainingComplete"), "Succeeded")

    status = kube.ftj(namespace, "happy")["status"]
    assert status["observedGeneration"] == 1
    assert status["startTime"] and status["completionTime"]
    assert status["attempts"] == 1
    assert status["progress"]["step"] == 100 and status["progress"]["percent"] == 100.0
    assert status["progress"]["tokensSeen"] == 102400
    assert status["metrics"]["trainLoss"] == 1.75 and status["metrics"]["valLoss"] == 2.0
    assert status["metrics"]["valPerplexity"] == 7.39
    assert status["metrics"]["bestCheckpoint"]["step"] == 50
    assert [c["step"] for c in status["checkpoints"]] == [50]
    assert status["results"] == summary["results"]
    assert status["model"] == {"uri": "pvc://models/finetunes/happy/model", "digest": summary["modelDigest"]}
    for type_, value in (("Validated", "True"), ("Running", "False"), ("Failed", "False"),
                         ("Suspended", "False"), ("ServingReady", "False")):
        assert kube.condition_is(namespace, "happy", type_, value), type_
    expected = {"ValidatingDataset", "DatasetValid", "Training", "TrainingComplete"}

    def reasons() -> set[str]:  # Events are posted in the background, a moment after the status
        return {e.reason for e in kube.core.list_namespaced_event(namespace, field_selector="involvedObject.name=happy").items}

    wait_for(lambda: expected <= reasons(), "the lifecycle's Events")

    text = wait_for(lambda: (t := operator.metrics()) and metric(t, "kubetune_jobs", namespace=namespace,
                                                                 state="Succeeded") == 1 and t, "jobs metric")
    assert metric(text, "kubetune_job_train_loss", namespace=namespace, name="happy") == 1.75
    assert metric(text, "kubetune_job_validation_loss", namespace=namespace, name="happy") == 2.0
    assert metric(text, "kubetune_job_progress_ratio", namespace=namespace, name="happy") == 1.0
    assert metric(text, "kubetune_job_duration_seconds_count", namespace=namespace, outcome="Succeeded") == 1
    # Usage: from the pods' own times and the trainer's termination message, stored in status.
    usage = status["usage"]
    assert [a["kind"] for a in usage["attempts"]] == ["validation", "training"]
    training = usage["attempts"][1]
    assert training["accelerators"] == 1 and 1.0 <= training["acceleratorSeconds"] <= 120.0, usage
    assert usage["tokensProcessed"] == 102400 and usage["trainingAttempts"] == 1
    text = wait_for(lambda: (t := operator.metrics()) and metric(t, "kubetune_tokens_processed_total",
                                                                 namespace=namespace, tenant=namespace) and t,
                    "usage counters")
    assert metric(text, "kubetune_tokens_processed_total", namespace=namespace, tenant=namespace) == 102400
    assert metric(text, "kubetune_accelerator_seconds_total", namespace=namespace, tenant=namespace,
                  kind="training") == usage["training"]["acceleratorSeconds"]
    assert (metric(text, "kubetune_progress_reports_total", result="accepted", reason="") or 0) >= 4


def test_invalid_dataset_ends_the_job_before_any_gpu_is_held(kube: Kube, operator: OperatorProcess,
                                                             namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("baddata"))
    wait_for(lambda: kube.job(namespace, "baddata-validate"), "the validation Job")
    kube.run_pod_to_end(namespace, "baddata-validate", 78,
                        json.dumps({"outcome": "failed", "message": "dataset.train: column 'text' not found"}))
    wait_for(lambda: kube.condition_is(namespace, "baddata", "Failed", "True", "InvalidDataset"), "InvalidDataset")
    validated = kube.condition(namespace, "baddata", "Validated")
    assert validated is not None and validated["message"] == "dataset.train: column 'text' not found"
    time.sleep(3)  # a resync later, still no trainer
    assert kube.job(namespace, "baddata-train") is None
    assert len(kube.pods(namespace, "baddata-validate")) == 1, "exit 78 is not retried"


def test_permanent_trainer_failure_ends_without_retries(kube: Kube, operator: OperatorProcess,
                                                        namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("perm"))
    pass_validation(kube, namespace, "perm")
    kube.run_pod_to_end(namespace, "perm-train", 78, json.dumps({"outcome": "failed",
                                                                 "message": "model.source: no model found"}))
    wait_for(lambda: kube.condition_is(namespace, "perm", "Failed", "True", "PermanentError"), "PermanentError")
    failed = kube.condition(namespace, "perm", "Failed")
    assert failed is not None and "model.source: no model found" in failed["message"]
    time.sleep(3)
    assert len(kube.pods(namespace, "perm-train")) == 1, "a permanent error is never retried"
    assert kube.ftj(namespace, "perm")["status"]["attempts"] == 1


def test_retryable_failure_is_retried_and_the_new_pod_resumes(kube: Kube, operator: OperatorProcess,
                                                              namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("retry"))
    pass_validation(kube, namespace, "retry")
    first = kube.run_pod_to_end(namespace, "retry-train", 1, "RuntimeError: CUDA error: an illegal memory access")
    second = wait_for(lambda: (p := kube.live_pod(namespace, "retry-train")) and
                      p["metadata"]["name"] != first["metadata"]["name"] and p, "the retry pod", timeout=90)
    # The pod is told it is attempt 1: the Job controller's failure count reaches KUBETUNE_ATTEMPT.
    assert second["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"] == "1"
    env = {e["name"]: e for e in second["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_ATTEMPT"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-index-failure-count']"
    wait_for(lambda: kube.condition_is(namespace, "retry", "Running", "False", "Resuming"), "Running=Resuming")
    resuming = kube.condition(namespace, "retry", "Running")
    assert resuming is not None and "CUDA error" in resuming["message"]
    kube.set_pod_running(namespace, second)
    kube.set_pod_finished(namespace, second, 0, json.dumps({"outcome": "succeeded", "step": 10}))
    wait_for(lambda: kube.condition_is(namespace, "retry", "Succeeded", "True"), "Succeeded after a retry")
    assert kube.ftj(namespace, "retry")["status"]["attempts"] == 2


def test_suspend_stops_the_pod_and_resume_starts_a_new_one(kube: Kube, operator: OperatorProcess,
                                                           namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("pause"))
    pass_validation(kube, namespace, "pause")
    pod = wait_for(lambda: kube.live_pod(namespace, "pause-train"), "the trainer pod")
    kube.set_pod_running(namespace, pod)
    job = kube.ftj(namespace, "pause")
    checkpoint = report(job, 1, "checkpoint", step=20, checkpoint={"step": 20, "path": "/ckpt/step-20"})
    assert operator.post_report(checkpoint, token_of(kube, namespace, "pause"))[0] == 202
    kube.patch_ftj(namespace, "pause", {"spec": {"suspend": True}})
    wait_for(lambda: (kube.job(namespace, "pause-train") or {}).get("spec", {}).get("suspend") is True,
             "the trainer Job suspended")
    wait_for(lambda: kube.live_pod(namespace, "pause-train") is None, "the trainer pod stopped")
    wait_for(lambda: kube.condition_is(namespace, "pause", "Suspended", "True", "SuspendedByUser"), "Suspended")
    assert kube.condition_is(namespace, "pause", "Running", "False")
    assert [c["step"] for c in kube.ftj(namespace, "pause")["status"]["checkpoints"]] == [20]

    kube.patch_ftj(namespace, "pause", {"spec": {"suspend": False}})
    resumed = wait_for(lambda: (p := kube.live_pod(namespace, "pause-train")) and
                       p["metadata"]["name"] != pod["metadata"]["name"] and p, "a new trainer pod")
    wait_for(lambda: kube.condition_is(namespace, "pause", "Suspended", "False"), "Suspended=False")
    kube.set_pod_running(namespace, resumed)
    wait_for(lambda: kube.condition_is(namespace, "pause", "Running", "True"), "Running again")
    assert [c["step"] for c in kube.ftj(namespace, "pause")["status"]["checkpoints"]] == [20], \
        "checkpoints survive a suspend"


def test_deleting_a_finetunejob_removes_all_its_children(kube: Kube, operator: OperatorProcess,
                                                         namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("gone"))
    pass_validation(kube, namespace, "gone")
    wait_for(lambda: kube.live_pod(namespace, "gone-train"), "the trainer pod")
    kube.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs", "gone",
                                                propagation_policy="Foreground")

    def nothing_left() -> bool:
        left = [kube.job(namespace, "gone-train"), kube.job(namespace, "gone-validate")]
        left += kube.pods(namespace, "gone-train") + kube.pods(namespace, "gone-validate")
        for read, name in ((kube.core.read_namespaced_config_map, "gone-config"),
                           (kube.core.read_namespaced_secret, "gone-progress")):
            try:
                left.append(read(name, namespace))
            except ApiException as error:
                if error.status != 404:
                    raise
        return not any(left)

    wait_for(nothing_left, "every child of the deleted job to be gone", timeout=90)


def test_a_report_signed_for_job_a_is_rejected_for_job_b(kube: Kube, operator: OperatorProcess,
                                                         namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("alpha"))
    kube.create_ftj(namespace, finetunejob("beta"))
    wait_for(lambda: kube.job(namespace, "alpha-validate") and kube.job(namespace, "beta-validate"), "both jobs")
    alpha, beta = kube.ftj(namespace, "alpha"), kube.ftj(namespace, "beta")
    alpha_token = token_of(kube, namespace, "alpha")
    status, answer = operator.post_report(report(beta, 1, "progress", step=99, trainLoss=0.01), alpha_token)
    assert (status, answer["error"]) == (403, "WrongToken")
    assert operator.post_report(report(alpha, 1, "progress", step=1, trainLoss=3.0), alpha_token)[0] == 202
    # Malformed, oversized, unsigned and replayed reports are refused too, and the server stays up.
    assert operator.post_report({}, alpha_token, raw=b"{not json")[0] == 400
    assert operator.post_report({}, alpha_token, raw=b"{" + b" " * 70000 + b"}")[0] == 413
    assert operator.post_report(report(alpha, 2, "progress"), None)[0] == 401
    assert operator.post_report(report(alpha, 1, "progress", step=1), alpha_token)[0] == 409
    time.sleep(1.0)
    assert "metrics" not in (kube.ftj(namespace, "beta").get("status") or {}) or \
        kube.ftj(namespace, "beta")["status"]["metrics"].get("trainLoss") != 0.01
    alpha_metrics = wait_for(lambda: (kube.ftj(namespace, "alpha").get("status") or {}).get("metrics"),
                             "alpha's reported metrics")
    assert alpha_metrics["trainLoss"] == 3.0
    text = operator.metrics()
    assert (metric(text, "kubetune_progress_reports_total", result="rejected", reason="WrongToken") or 0) >= 1
    assert (metric(text, "kubetune_progress_reports_total", result="rejected", reason="Replayed") or 0) >= 1


def test_restarting_the_operator_mid_job_creates_no_duplicates(kube: Kube, operator: OperatorProcess,
                                                               namespace: str) -> None:
    kube.create_ftj(namespace, finetunejob("steady"))
    pass_validation(kube, namespace, "steady")
    pod = wait_for(lambda: kube.live_pod(namespace, "steady-train"), "the trainer pod")
    before = kube.job(namespace, "steady-train")
    assert before is not None
    operator.kill()
    # The pod starts while no operator runs: only the restarted operator can mark the job Running,
    # so that condition is the positive signal that it has reconciled the job after the restart.
    kube.set_pod_running(namespace, pod)
    assert not kube.condition_is(namespace, "steady", "Running", "True")
    operator.start()
    wait_for(lambda: kube.condition_is(namespace, "steady", "Running", "True", "Training"),
             "the restarted operator marks the running job Running")
    after = kube.job(namespace, "steady-train")
    assert after is not None and after["metadata"]["uid"] == before["metadata"]["uid"]
    jobs = kube.batch.list_namespaced_job(namespace).items
    assert sorted(j.metadata.name for j in jobs) == ["steady-train", "steady-validate"]
    assert [p["metadata"]["name"] for p in kube.pods(namespace, "steady-train")] == [pod["metadata"]["name"]]
    assert len(kube.core.list_namespaced_config_map(namespace, label_selector=
                                                    "app.kubernetes.io/instance=steady").items) == 1
    kube.set_pod_finished(namespace, pod, 0, json.dumps({"outcome": "succeeded"}))
    wait_for(lambda: kube.condition_is(namespace, "steady", "Succeeded", "True"), "Succeeded after a restart")


def test_trainer_pods_pass_restricted_pod_security_admission(kube: Kube, operator: OperatorProcess,
                                                             namespace: str, cluster: Any) -> None:
    kube.create_ftj(namespace, finetunejob("secure"))
    pass_validation(kube, namespace, "secure")
    # The namespace enforces `restricted`: the Job controller could create the pod, so admission passed.
    pod = wait_for(lambda: kube.live_pod(namespace, "secure-train"), "an admitted trainer pod")
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # And the same template fails nowhere on a server-side dry run (no warnings either).
    template = kube.job(namespace, "secure-train")["spec"]["template"]  # type: ignore[index]
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": namespace},
                "spec": template["spec"]}
    result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
    assert result.returncode == 0, result.stderr
    assert "violate" not in (result.stderr or "")
    # A privileged variant is refused in the same namespace: the admission really enforces.
    manifest["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(manifest), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr


@pytest.mark.parametrize("ttl", [1])
def test_ttl_removes_training_children_and_keeps_the_job(kube: Kube, operator: OperatorProcess,
                                                         namespace: str, ttl: int) -> None:
    kube.create_ftj(namespace, finetunejob("short", ttlSecondsAfterFinished=ttl))
    pass_validation(kube, namespace, "short")
    kube.run_pod_to_end(namespace, "short-train", 0, json.dumps({"outcome": "succeeded",
                                                                 "modelDigest": "sha256:00"}))
    wait_for(lambda: kube.condition_is(namespace, "short", "Succeeded", "True"), "Succeeded")
    wait_for(lambda: kube.job(namespace, "short-train") is None and kube.job(namespace, "short-validate") is None,
             "the training Jobs removed after the TTL", timeout=30)
    status = kube.ftj(namespace, "short")["status"]
    assert status["model"]["digest"] == "sha256:00"
    assert kube.condition_is(namespace, "short", "Succeeded", "True")
