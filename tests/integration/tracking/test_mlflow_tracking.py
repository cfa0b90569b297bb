"""`tracking.mlflow`: the trainer program logs its run to a real MLflow server (the `mlflow_server`
fixture, `mlflow server` with SQLite and proxied artifacts) over the REST API, read back here through
the same API: the run, every step's loss, the test results, the artifacts; a server that is down
does not fail training; a resumed attempt continues the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import process as api_process
from kubetune.dev import mlflow_server, tinymodel
from kubetune.trainer import tracking
from kubetune.trainer.__main__ import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.create_tiny_model(tmp_path_factory.mktemp("base") / "model", arch="gpt2")


def write_config(tmp_path: Path, model: Path, tracking_uri: str, *, epochs: int = 1, experiment: str = "") -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(120, seed=6)))
    out = tmp_path / "out"
    content: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(train)}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": epochs, "learningRate": 3e-3, "batchSize": 8, "maxSeqLength": 64},
        "training": {"checkpointInterval": 2, "keepCheckpoints": 2, "evalInterval": 4},
        "evaluation": {"baseline": True},
        "output": {"dir": str(out), "checkpointDir": str(out / "checkpoints")},
        "job": {"namespace": "team-a", "name": "tuned", "uid": "uid-1"},
        # experiment absent: the job's namespace (the operator fills it in; the trainer falls back the same way)
        "tracking": {"mlflow": {"trackingUri": tracking_uri, **({"experiment": experiment} if experiment else {})}},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    return path


def history(server: mlflow_server.MlflowServer, run_id: str, key: str) -> list[dict[str, Any]]:
    return list(server.api("/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key,
                           max_results=25000).get("metrics", []))


def test_the_run_its_steps_results_and_artifacts_are_logged(
        tmp_path: Path, model: Path, mlflow: mlflow_server.MlflowServer, termination_log: Path) -> None:
    assert main(["--config", str(write_config(tmp_path, model, mlflow.url))]) == api_process.EXIT_OK

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    summary = json.loads(termination_log.read_text())["tracking"]
    assert summary["state"] == "ok", summary
    run_id = summary["runId"]
    assert json.loads((tmp_path / "out" / tracking.STATE_FILE).read_text())["runId"] == run_id
    run = mlflow.api("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tuned"
    experiment = mlflow.api("/api/2.0/mlflow/experiments/get", experiment_id=run["info"]["experiment_id"])
    assert experiment["experiment"]["name"] == "team-a"  # the namespace, by default
    assert summary["url"] == f"{mlflow.url}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["kubetune.job.namespace"] == "team-a" and tags["kubetune.job.uid"] == "uid-1"
    assert tags["kubetune.attempt"] == "0"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert float(params["learningRate"]) == 3e-3 and params["method.type"] == "full"
    assert params["model.source"] == str(model)

    losses = history(mlflow, run_id, "trainLoss")
    assert [m["step"] for m in sorted(losses, key=lambda m: m["step"])] == list(range(1, metrics["step"] + 1))
    assert {m["step"]: m["value"] for m in losses} == {s: v for s, v in metrics["history"]["trainLoss"]}
    evaluations = {e["step"]: e["valLoss"] for e in metrics["history"]["evaluations"]}
    assert {m["step"]: m["value"] for m in history(mlflow, run_id, "valLoss")} == evaluations
    assert history(mlflow, run_id, "learningRate")
    final = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    numbers = {k: v for k, v in metrics["results"].items() if isinstance(v, (int, float))}
    assert numbers and all(final[f"test.{k}"] == float(v) for k, v in numbers.items())
    assert final["baseline.perplexity"] == metrics["results"]["baseline"]["perplexity"]

    listed = mlflow.api("/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])
    sizes = {f["path"]: int(f.get("file_size", 0)) for f in listed}
    assert {"loss_curve.png", "loss_curve.csv", "README.md", "metrics.json"} <= set(sizes), sizes
    assert sizes["loss_curve.png"] == (tmp_path / "out" / "loss_curve.png").stat().st_size
    assert sizes["README.md"] == (tmp_path / "out" / "README.md").stat().st_size


def test_a_server_that_is_down_does_not_fail_training(
        tmp_path: Path, model: Path, termination_log: Path) -> None:
    closed = f"http://127.0.0.1:{mlflow_server.free_port()}"

    assert main(["--config", str(write_config(tmp_path, model, closed))]) == api_process.EXIT_OK

    summary = json.loads(termination_log.read_text())
    assert summary["outcome"] == "succeeded"
    assert summary["tracking"]["state"] == "unavailable"
    assert closed in summary["tracking"]["message"]
    assert (tmp_path / "out" / "model").is_dir()


def test_a_resumed_attempt_continues_the_same_run(
        tmp_path: Path, model: Path, mlflow: mlflow_server.MlflowServer) -> None:
    config_path = write_config(tmp_path, model, mlflow.url, epochs=3, experiment="resumes")
    env = os.environ | {"KUBETUNE_PROGRESS_INTERVAL": "0", api_process.ENV_TERMINATION_LOG: str(tmp_path / "log-1")}
    env.pop(api_process.ENV_PROGRESS_URL, None)
    first = subprocess.Popen([sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert first.stdout is not None
    for line in first.stdout:
        report = json.loads(line) if line.startswith("{") else {}
        if report.get("kind") == "progress" and report.get("step") == 5:
            first.send_signal(signal.SIGTERM)
            break
    first.stdout.read()
    assert first.wait(timeout=300) == api_process.EXIT_PREEMPTED
    stopped = json.loads((tmp_path / "log-1").read_text())
    assert stopped["outcome"] == "preempted" and stopped["tracking"]["state"] == "ok"
    run_id = stopped["tracking"]["runId"]
    assert mlflow.api("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]["info"]["status"] == "KILLED"

    env = env | {api_process.ENV_TERMINATION_LOG: str(tmp_path / "log-2"), api_process.ENV_ATTEMPT: "1"}
    second = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == api_process.EXIT_OK, second.stderr[-3000:]
    assert json.loads((tmp_path / "log-2").read_text())["tracking"]["runId"] == run_id

    experiment = mlflow.api("/api/2.0/mlflow/experiments/get-by-name", experiment_name="resumes")["experiment"]
    assert [r["info"]["run_id"] for r in mlflow.search_runs(experiment["experiment_id"])] == [run_id]  # not two
    run = mlflow.api("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["kubetune.attempt"] == "1"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    steps = sorted(m["step"] for m in history(mlflow, run_id, "trainLoss"))
    assert steps == list(range(1, metrics["step"] + 1))  # one value per step across both attempts
