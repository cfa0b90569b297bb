"""`output.storage: s3://…`: the trainer program mirrors its outputs to a real S3 store (SeaweedFS, the
`s3_store` fixture) — model, metrics.json, model card, loss curve and checkpoints — and a new pod, whose
scratch folder starts empty, resumes from the checkpoints in the bucket."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import process as api_process
from kubetune.dev import objectstore, tinymodel
from kubetune.trainer import objectstore as trainer_objectstore
from kubetune.trainer.__main__ import main

pytestmark = pytest.mark.integration


@pytest.fixture
def pod_env(s3_store: objectstore.SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(trainer_objectstore.CACHE_DIR_ENV, str(tmp_path / "model-cache"))
    monkeypatch.delenv(api_process.ENV_PROGRESS_URL, raising=False)
    log = tmp_path / "termination-log"
    monkeypatch.setenv(api_process.ENV_TERMINATION_LOG, str(log))
    return log


def run(tmp_path: Path, model: Path, uri: str, scratch: Path) -> int:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(120, seed=6)))
    content: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(train)}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8, "maxSeqLength": 64},
        "training": {"checkpointInterval": 1, "keepCheckpoints": 2},
        "evaluation": {"baseline": False},
        "output": {"dir": str(scratch), "checkpointDir": str(scratch / "checkpoints"), "uri": uri},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    return main(["--config", str(path)])


def test_outputs_are_uploaded_and_a_fresh_pod_resumes_from_the_bucket(
        tmp_path: Path, s3_store: objectstore.SeaweedS3, pod_env: Path) -> None:
    s3_store.create_bucket("outputs")
    model = tinymodel.create_tiny_model(tmp_path / "base", arch="gpt2")
    scratch = tmp_path / "scratch"
    assert run(tmp_path, model, "s3://outputs/finetunes/job-1", scratch) == api_process.EXIT_OK, pod_env.read_text()
    local_metrics = json.loads((scratch / "metrics.json").read_text())
    assert local_metrics["model"]["uri"] == "s3://outputs/finetunes/job-1/model"  # what status.model.uri gets

    fs = s3_store.filesystem()
    stored = {p[len("outputs/finetunes/job-1/"):] for p in fs.find("outputs/finetunes/job-1", refresh=True)}
    assert {"metrics.json", "README.md", "loss_curve.png", "model/config.json", "model/model.safetensors"} <= stored
    checkpoints = sorted({p.split("/")[1] for p in stored if p.startswith("checkpoints/")})
    assert checkpoints == sorted(p.name for p in (scratch / "checkpoints").glob("step-*"))  # pruned alike
    assert len(checkpoints) == 2
    assert all(f"checkpoints/{c}/trainer_state.json" in stored for c in checkpoints)
    assert json.loads(fs.cat("outputs/finetunes/job-1/metrics.json"))["model"]["digest"] == local_metrics["model"]["digest"]

    # A new pod: its scratch space is empty; the checkpoints come back from the bucket.
    shutil.rmtree(scratch)
    assert run(tmp_path, model, "s3://outputs/finetunes/job-1", scratch) == api_process.EXIT_OK, pod_env.read_text()
    resumed = json.loads((scratch / "metrics.json").read_text())
    latest = max(checkpoints, key=lambda c: int(c.split("-")[1]))
    assert resumed["resumedFrom"] == str(scratch / "checkpoints" / latest)


def test_a_missing_output_bucket_is_a_storage_error_naming_the_field(
        tmp_path: Path, s3_store: objectstore.SeaweedS3, pod_env: Path) -> None:
    model = tinymodel.create_tiny_model(tmp_path / "base", arch="gpt2")
    assert run(tmp_path, model, "s3://no-output-bucket/x", tmp_path / "scratch") == api_process.EXIT_PERMANENT
    summary = json.loads(pod_env.read_text())
    assert summary["reason"] == "StorageUnavailable"
    assert summary["message"].startswith("output.storage: s3://no-output-bucket/x: the bucket 'no-output-bucket' "
                                         "does not exist")
