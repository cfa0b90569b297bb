"""`kubetune run JOB.yaml`: one manifest trained on this machine, no cluster, claims mapped to folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import layout
from kubetune.cli import main as cli
from kubetune.dev import tinymodel
from kubetune.operator.progress import reports
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.slow


def write_manifest(folder: Path, **method: object) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "local-tune"}, "spec": {
        "model": {"source": "pvc://models/base/tiny"},
        "dataset": {"format": "text", "train": {"source": "pvc://data/train.jsonl"}},
        "method": {"type": "lora", **method}, "hyperparameters": {"epochs": 1, "batchSize": 8},
        "evaluation": {"baseline": False, "samples": 0},
        "output": {"storage": "pvc://models/finetunes"}}}))
    return path


@pytest.fixture
def claims(tmp_path: Path) -> dict[str, Path]:
    models, data = tmp_path / "models", tmp_path / "data"
    tinymodel.create_tiny_model(models / "base" / "tiny")
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in tinymodel.default_corpus(60)))
    return {"models": models, "data": data}


def test_run_trains_into_the_mapped_claim_where_the_operator_would_look(
        tmp_path: Path, claims: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, lora={"merge": False})

    code = cli.main(["run", str(manifest), "--volume", f"models={claims['models']}",
                     "--volume", f"data={claims['data']}"])

    out = capfd.readouterr().out
    assert code == 0, out[-2000:]
    output = claims["models"] / "finetunes" / "local-tune"
    adapter = Path(layout.model_location(str(output), "lora", False))
    assert adapter == output / "adapter" and (adapter / "adapter_config.json").is_file()
    metrics = json.loads((output / layout.METRICS_FILE).read_text())
    assert metrics["model"]["uri"] == str(adapter.resolve())
    # Every report the real run printed is one the operator accepts; `started` carries the resolved
    # hyperparameters that become status.resolved.
    lines = [line for line in out.splitlines() if line.startswith('{"job"')]
    local = reports.JobKey("local", "local-tune", "")  # no cluster, no uid: checked as the operator checks fields
    parsed = [reports.validate_report(reports.decode_report(line.encode(), OperatorSettings().max_report_bytes), local)
              for line in lines]
    assert parsed[0].kind == "started" and parsed[-1].kind == "completed"
    resolved = [reports.merge_report({}, r, recent_checkpoints=5).get("resolved") for r in parsed]
    started_with_resolved = next(r for r, values in zip(parsed, resolved) if values)
    assert started_with_resolved.kind == "started"
    assert resolved[-1] == {k: v for k, v in metrics["hyperparameters"].items() if v is not None}


def test_run_refuses_a_manifest_whose_claims_are_not_mapped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(write_manifest(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "data, models" in err and "--volume CLAIM=DIR" in err


def test_run_names_what_is_wrong_with_an_invalid_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path)
    job = yaml.safe_load(manifest.read_text())
    job["spec"]["hyperparameters"]["learningRate"] = -1
    manifest.write_text(yaml.safe_dump(job))

    assert cli.main(["run", str(manifest)]) == 2
    assert "learningRate" in capsys.readouterr().err
