"""`s3://` model and dataset sources read by the trainer program from a real S3 store (SeaweedFS on
loopback, the `s3_store` fixture), credentials from the environment as `spec.credentials.s3` gives them;
and each way an object-store location can be unusable ends validation with a StorageError that names the
field, before any training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import process as api_process
from kubetune.dev import objectstore, tinymodel
from kubetune.trainer.__main__ import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket(s3_store: objectstore.SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bucket holding a tiny model folder (`model/`) and a training file (`data/train.jsonl`)."""
    store = s3_store
    store.create_bucket("sources")
    fs = store.filesystem()
    model = tinymodel.create_tiny_model(tmp_path_factory.mktemp("tiny"), arch="gpt2")
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"sources/model/{path.relative_to(model).as_posix()}")
    records = "".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(120, seed=3))
    fs.pipe("sources/data/train.jsonl", records.encode())
    return "sources"


@pytest.fixture
def pod_env(s3_store: objectstore.SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The environment a pod gets from spec.credentials.s3; returns the termination-log path."""
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(objectstore_cache_env(), str(tmp_path / "model-cache"))
    monkeypatch.delenv(api_process.ENV_PROGRESS_URL, raising=False)
    log = tmp_path / "termination-log"
    monkeypatch.setenv(api_process.ENV_TERMINATION_LOG, str(log))
    return log


def objectstore_cache_env() -> str:
    from kubetune.trainer import objectstore as trainer_objectstore

    return trainer_objectstore.CACHE_DIR_ENV


def run(tmp_path: Path, model: str, train: str, *extra: str, **sections: Any) -> int:
    content: dict[str, Any] = {
        "model": {"source": model},
        "dataset": {"format": "text", "train": {"source": train}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8, "maxSeqLength": 64},
        "evaluation": {"baseline": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    content.update(sections)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    return main(["--config", str(path), *extra])


class TestSourcesInABucket:
    def test_validation_reads_the_model_and_the_data_from_the_bucket(
            self, tmp_path: Path, bucket: str, pod_env: Path) -> None:
        code = run(tmp_path, f"s3://{bucket}/model", f"s3://{bucket}/data/train.jsonl", "--validate-only")
        assert code == api_process.EXIT_OK, pod_env.read_text()
        summary = json.loads(pod_env.read_text())
        assert summary["outcome"] == "validated"
        assert int(summary["message"].split(" train")[0]) > 90  # 120 records less the validation/test splits
        assert summary["sizing"]["model"]["parameters"] > 0, summary  # the model was read, not only the data

    def test_a_run_trains_the_bucket_model_on_the_bucket_data(self, tmp_path: Path, bucket: str,
                                                              pod_env: Path) -> None:
        code = run(tmp_path, f"s3://{bucket}/model", f"s3://{bucket}/data/train.jsonl")
        assert code == api_process.EXIT_OK, pod_env.read_text()
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert metrics["step"] > 0 and metrics["model"]["digest"].startswith("sha256:")


class TestUnusableLocationsEndValidationNamingTheField:
    @pytest.mark.parametrize(("model", "train", "field", "what"), [
        ("s3://no-such-bucket/model", "s3://sources/data/train.jsonl", "model.source",
         "the bucket 'no-such-bucket' does not exist"),
        ("s3://sources/no-such-model", "s3://sources/data/train.jsonl", "model.source",
         "no objects under 'no-such-model'"),
        ("s3://sources/model", "s3://sources/data/missing.jsonl", "dataset.train.source",
         "no object or folder 'data/missing.jsonl'"),
        ("s3://sources/model", "s3://missing-data/train.jsonl", "dataset.train.source",
         "the bucket 'missing-data' does not exist"),
    ])
    def test_a_missing_bucket_or_key(self, tmp_path: Path, bucket: str, pod_env: Path, model: str, train: str,
                                     field: str, what: str) -> None:
        assert run(tmp_path, model, train, "--validate-only") == api_process.EXIT_PERMANENT
        summary = json.loads(pod_env.read_text())
        assert summary["reason"] == "StorageUnavailable"
        assert summary["message"].startswith(f"{field}: ") and what in summary["message"], summary["message"]

    def test_wrong_credentials(self, tmp_path: Path, bucket: str, pod_env: Path, s3_store: objectstore.SeaweedS3,
                               monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        assert run(tmp_path, f"s3://{bucket}/model", f"s3://{bucket}/data/train.jsonl",
                   "--validate-only") == api_process.EXIT_PERMANENT
        summary = json.loads(pod_env.read_text())
        assert summary["reason"] == "StorageUnavailable"
        assert summary["message"].startswith("model.source: s3://sources/model: the store refused the credentials "
                                             "(spec.credentials.s3")
        assert s3_store.secret_key not in pod_env.read_text() and "not-the-secret" not in pod_env.read_text()

    def test_an_unreachable_endpoint(self, tmp_path: Path, bucket: str, pod_env: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
        assert run(tmp_path, f"s3://{bucket}/model", f"s3://{bucket}/data/train.jsonl",
                   "--validate-only") == api_process.EXIT_PERMANENT
        summary = json.loads(pod_env.read_text())
        assert summary["reason"] == "StorageUnavailable"
        assert summary["message"].startswith("model.source: s3://sources/model: the object store at "
                                             "http://127.0.0.1:9 does not answer"), summary["message"]
