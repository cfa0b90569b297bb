"""`kubetune estimate JOB.yaml`: the estimate and recommendation for a manifest, with no cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import messages, schema as apischema
from kubetune.cli import main as cli
from kubetune.dev import tinymodel


@pytest.fixture(scope="module")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("estimate-cli")
    tinymodel.create_tiny_model(folder / "model")
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in tinymodel.default_corpus(120)))
    (folder / "policy.yaml").write_text(yaml.safe_dump({"gpuTypes": [
        {"name": "T4", "memoryGiB": 16, "maxPerNode": 4, "nodeSelector": {"gpu": "t4"}},
        {"name": "H100", "memoryGiB": 80, "maxPerNode": 8, "nodeSelector": {"gpu": "h100"}}]}))
    return folder


def manifest(folder: Path, **resources: object) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "tiny"}, "spec": {
        "model": {"source": str(folder / "model")},
        "dataset": {"format": "text", "train": {"source": str(folder / "train.jsonl")}},
        "method": {"type": "full"}, "hyperparameters": {"epochs": 2},
        "output": {"storage": str(folder / "out")}, "resources": resources}}))
    return path


def test_prints_memory_tokens_and_a_cpu_recommendation_without_gpu_types(
        job_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", str(manifest(job_files, gpus="auto")), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["gpus"] == 0 and "training on CPU" in out["estimate"]["message"]
    assert out["estimate"]["tokensToProcess"] == 2 * out["sizing"]["data"]["trainTokens"]
    assert out["breakdown"]["weights"] == 4 * out["sizing"]["model"]["parameters"]


def test_the_validation_pods_sizing_facts_fit_the_shared_contract(
        job_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What the trainer's validation computes is exactly `kubetune.api.messages.SizingFacts` (every key, the
    right types, nothing else), the shape the operator's estimate reads."""
    assert cli.main(["estimate", str(manifest(job_files)), "--json"]) == 0
    sizing = json.loads(capsys.readouterr().out)["sizing"]
    assert apischema.parse(messages.SizingFacts, sizing, "sizing") == sizing
    assert sizing["hyperparameters"]["cpu"]["epochs"] == 2 and sizing["data"]["trainExamples"] > 0


def test_picks_the_smallest_gpu_type_from_the_policy(job_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["estimate", str(manifest(job_files, gpus="auto")), "--policy", str(job_files / "policy.yaml")])
    out = capsys.readouterr().out
    assert code == 0
    assert "recommendation (fits): 1× T4 (16 GiB)" in out and "tokens to process" in out


def test_a_job_that_cannot_fit_exits_1_and_says_what_would(job_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", str(manifest(job_files, gpus=0, memory="16Mi"))]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "would fit: resources.memory of at least" in out
