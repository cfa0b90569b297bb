"""The `kubetune` status commands against the real API server: status, loss, events, logs.

No operator runs here: the test writes the FineTuneJob's status (as the operator would, through
the status subresource), its Event and its trainer Job, then asks the CLI, which asks kubectl.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kubetune.cli import main as cli
from kubetune.operator import names

REPO = Path(__file__).resolve().parents[3]
GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
NOW = "2026-03-01T12:00:00Z"
EVALUATIONS = 12
"""More evaluations than status.checkpoints keeps (5): the loss curve must show every one."""


@pytest.fixture(scope="module")
def api(cluster: Any) -> Any:
    cluster.kubectl("apply", "-f", str(REPO / "crds" / "finetunejobs.kubetune.io.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.io")
    return cluster.api_client()


@pytest.fixture
def namespace(cluster: Any, api: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    name = f"kubetune-cli-{secrets.token_hex(4)}"
    core = kubernetes.client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def create_job_with_status(api: Any, namespace: str, name: str) -> dict[str, Any]:
    custom = kubernetes.client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"model": {"source": "pvc://models/base/tiny"},
                 "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
                 "output": {"storage": "pvc://models/finetunes"}}})
    evaluations = [{"step": 10 * i, "valLoss": round(4.0 - 0.1 * i, 4), "valPerplexity": round(60.0 - i, 4)}
                   for i in range(EVALUATIONS)]
    checkpoints = [{"step": 10 * i, "path": f"/mnt/pvc/models/finetunes/{name}/checkpoints/step-{10 * i}",
                    "valLoss": round(4.0 - 0.1 * i, 4), "time": NOW} for i in range(EVALUATIONS - 5, EVALUATIONS)]
    status = {
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainingSucceeded",
                        "message": "trained 110 steps", "lastTransitionTime": NOW}],
        "progress": {"step": 110, "totalSteps": 110, "percent": 100.0},
        "metrics": {"trainLoss": 2.5, "valLoss": 2.9, "evaluations": evaluations,
                    "bestCheckpoint": {"step": 110, "path": checkpoints[-1]["path"], "valLoss": 2.9}},
        "checkpoints": checkpoints,
        "results": {"loss": 2.0, "perplexity": 7.389, "baseline": {"loss": 3.0, "perplexity": 20.09},
                    "improvement": {"perplexityDrop": 0.632, "lossDrop": 1.0}},
        "samples": [{"prompt": "How do I pause a job?", "reference": "Set spec.suspend.",
                     "base": "I am not sure.", "tuned": "Set spec.suspend: true."}],
        "model": {"uri": f"pvc://models/finetunes/{name}/model", "digest": "sha256:0123456789abcdef"},
    }
    return dict(custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                             {"status": status}))


class TestStatusCommands:
    def test_status_shows_conditions_results_against_the_base_model_and_samples(
            self, api: Any, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
        create_job_with_status(api, namespace, "tune")

        assert cli.main(["status", "tune", "-n", namespace, "--samples"]) == 0

        out = capsys.readouterr().out
        assert f"{namespace}/tune" in out
        assert "Succeeded" in out and "trained 110 steps" in out
        assert "perplexity" in out and "20.09" in out and "7.389" in out
        assert "pvc://models/finetunes/tune/model" in out
        assert "Set spec.suspend: true." in out and "I am not sure." in out

    def test_status_of_a_missing_job_fails_with_kubectls_message(
            self, api: Any, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["status", "absent", "-n", namespace]) == 1
        assert '"absent" not found' in capsys.readouterr().err

    def test_loss_prints_every_evaluation_not_only_the_recent_checkpoints(
            self, api: Any, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
        create_job_with_status(api, namespace, "curve")

        assert cli.main(["loss", "curve", "-n", namespace]) == 0

        lines = capsys.readouterr().out.splitlines()
        rows = [line.split() for line in lines[1:] if line.strip() and line.split()[0].isdigit()]
        assert [int(row[0]) for row in rows] == [10 * i for i in range(EVALUATIONS)]
        assert rows[0][1:3] == ["4.0000", "60.0000"]
        assert rows[-1][1:] == ["2.9000", "49.0000", "best"]
        assert [row[-1] for row in rows[-5:-1]] == ["kept"] * 4
        assert lines[-1].startswith("latest: train loss 2.5, val loss 2.9")

    def test_events_lists_the_jobs_events_only(self, api: Any, namespace: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        job = create_job_with_status(api, namespace, "noisy")
        core = kubernetes.client.CoreV1Api(api)
        for involved, reason in (("noisy", "SampleAnswers"), ("other", "SomethingElse")):
            core.create_namespaced_event(namespace, {
                "metadata": {"generateName": f"{involved}-"}, "reason": reason, "message": f"about {involved}",
                "type": "Normal", "firstTimestamp": NOW, "lastTimestamp": NOW, "count": 1,
                "source": {"component": "kubetune-operator"},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "name": involved,
                                   "namespace": namespace, "uid": job["metadata"]["uid"]}})

        assert cli.main(["events", "noisy", "-n", namespace]) == 0

        out = capsys.readouterr().out
        assert "SampleAnswers" in out and "about noisy" in out
        assert "SomethingElse" not in out

    def test_logs_asks_for_the_trainer_job_the_operator_names(self, api: Any, namespace: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
        # The operator's trainer Job is names.trainer_job(NAME) (`NAME-train`): without it, kubectl's
        # answer names that Job; with it (and its pod, which no kubelet runs here), kubectl finds it.
        assert cli.main(["logs", "tune", "-n", namespace]) == 1
        assert f'jobs.batch "{names.trainer_job("tune")}" not found' in capsys.readouterr().out

        batch = kubernetes.client.BatchV1Api(api)
        job_name = names.trainer_job("tune")
        batch.create_namespaced_job(namespace, {
            "metadata": {"name": job_name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "trainer", "image": "kubetune-trainer:test", "command": ["true"]}]}}}})
        core = kubernetes.client.CoreV1Api(api)
        deadline = time.monotonic() + 60
        while not core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items:
            assert time.monotonic() < deadline, "the Job controller made no pod"
            time.sleep(0.25)

        assert cli.main(["logs", "tune", "-n", namespace]) == 0
        assert "not found" not in capsys.readouterr().out
