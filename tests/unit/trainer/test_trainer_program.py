"""The trainer program end to end on a tiny model: outputs, methods, formats, early stopping, exit codes, reports."""

from __future__ import annotations

import http.server
import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import process as api_process
from kubetune.trainer.__main__ import main

from .trainer_runs import classification_records, config, text_records, write_config, write_jsonl

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, content: dict[str, Any]) -> int:
    return main(["--config", str(write_config(tmp_path / "config.json", content))])


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


class TestSmokeRun:
    def test_whole_program_on_a_tiny_gpt2_lowers_validation_loss_and_writes_every_output(
        self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        train = write_jsonl(tmp_path / "train.jsonl", text_records())
        out = tmp_path / "out"
        code = _run(tmp_path, config(tiny_gpt2, train, out))

        assert code == api_process.EXIT_OK
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["valLoss"] < metrics["initialValLoss"] - 0.5
        assert metrics["step"] == metrics["totalSteps"] > 0
        assert metrics["results"]["perplexity"] > 1 and 0 <= metrics["results"]["tokenAccuracy"] <= 1
        assert metrics["data"]["cleaning"]["train"]["read"] == 300
        assert metrics["hyperparameters"]["learningRate"] == 3e-3
        assert "maxSeqLength" in metrics["hyperparameters"]["automatic"]
        assert metrics["model"]["digest"].startswith("sha256:")
        assert [s for s, _ in metrics["history"]["trainLoss"]] == list(range(1, metrics["step"] + 1))
        model = AutoModelForCausalLM.from_pretrained(out / "model")
        assert model.config.n_layer == 2
        assert AutoTokenizer.from_pretrained(out / "model").eos_token == "<|endoftext|>"
        assert "validation loss:" in (out / "README.md").read_text()
        assert _png_size(out / "loss_curve.png") == (800, 450)
        summary = json.loads(termination_log.read_text())
        assert summary["outcome"] == "succeeded" and summary["modelDigest"] == metrics["model"]["digest"]
        assert len(termination_log.read_bytes()) < 4096
        checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert checkpoints == [f"step-{metrics['step'] - 2}", f"step-{metrics['step']}"]  # keepCheckpoints: 2

    def test_lora_adapters_saved_separately_name_their_base_model(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        from peft import AutoPeftModelForCausalLM

        train = write_jsonl(tmp_path / "train.jsonl", text_records(120))
        out = tmp_path / "out"

        code = _run(tmp_path, config(tiny_gpt2, train, out, method={"type": "lora", "lora": {"merge": False}}))

        assert code == api_process.EXIT_OK
        adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(tiny_gpt2)
        assert sorted(adapter_config["target_modules"]) == ["c_attn", "c_proj"]
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert not (out / "model").exists()
        assert AutoPeftModelForCausalLM.from_pretrained(out / "adapter") is not None
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"] / 5

    def test_lora_on_a_llama_architecture_adapts_the_attention_projections(
        self, tmp_path: Path, tiny_llama: Path, termination_log: Path
    ) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records(120))
        out = tmp_path / "out"

        code = _run(
            tmp_path,
            config(tiny_llama, train, out, method={"type": "lora", "lora": {"merge": False}}, training={"gradientCheckpointing": True}),
        )

        assert code == api_process.EXIT_OK
        adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    def test_lora_merged_model_is_a_plain_model(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        from safetensors import safe_open

        train = write_jsonl(tmp_path / "train.jsonl", text_records(120))
        out = tmp_path / "out"

        content = config(tiny_gpt2, train, out, method={"type": "lora"}, hyperparameters={"dropout": 0.0, "weightDecay": 0.1})

        assert _run(tmp_path, content) == api_process.EXIT_OK

        saved_config = json.loads((out / "model" / "config.json").read_text())
        assert saved_config["resid_pdrop"] == saved_config["attn_pdrop"] == 0.0  # dropout override
        with safe_open(out / "model" / "model.safetensors", "pt") as weights:
            assert not [k for k in weights.keys() if "lora" in k]

    def test_classification_reports_per_class_metrics_and_a_confusion_matrix(
        self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", classification_records())
        out = tmp_path / "out"
        content = config(
            tiny_gpt2, train, out,
            dataset={"format": "classification", "imbalance": {"strategy": "classWeights"}, "split": {"validation": 0.1, "test": 0.2}},
            hyperparameters={"epochs": 3},
        )

        assert _run(tmp_path, content) == api_process.EXIT_OK

        metrics = json.loads((out / "metrics.json").read_text())
        results = metrics["results"]
        imbalance = metrics["data"]["imbalance"]
        assert imbalance["strategy"] == "classWeights"
        assert imbalance["classWeights"]["negative"] > 1 > imbalance["classWeights"]["positive"]
        matrix = results["confusionMatrix"]
        assert matrix["labels"] == ["negative", "positive"]
        assert sum(map(sum, matrix["matrix"])) == results["examples"] == 24
        assert set(results["perClass"]) == {"negative", "positive"}
        assert {"accuracy", "precision", "recall", "f1", "perplexity", "tokenAccuracy"} <= set(results)
        assert 0 <= results["f1"] <= 1
        # Every report of this real run is accepted by the operator's parser, and the completed one
        # brings valLoss, the model and the per-class results into status.
        from kubetune.operator.progress import reports

        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"job"')]
        parsed = [reports.validate_report(reports.decode_report(line.encode(), 64 * 1024), reports.JobKey("", "", ""))
                  for line in lines]
        assert parsed[-1].kind == "completed"
        patch = reports.merge_report({}, parsed[-1], recent_checkpoints=5)
        assert patch["results"]["perClass"] == results["perClass"]
        assert patch["results"]["confusionMatrix"] == matrix
        assert patch["metrics"]["valLoss"] == metrics["valLoss"] and patch["model"]["digest"] == metrics["model"]["digest"]
        assert patch["resolved"] == {k: v for k, v in metrics["hyperparameters"].items() if v is not None}

    @pytest.mark.parametrize("fmt", ["prompt_completion", "chat"])
    def test_supervised_formats_train(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path, fmt: str) -> None:
        records = []
        for i, item in enumerate(text_records(100)):
            question, answer = f"Question {i}: what happens next?", item["text"]
            if fmt == "chat":
                records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
            else:
                records.append({"prompt": question, "completion": " " + answer})
        train = write_jsonl(tmp_path / "train.jsonl", records)
        out = tmp_path / "out"

        assert _run(tmp_path, config(tiny_gpt2, train, out, dataset={"format": fmt})) == api_process.EXIT_OK

        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["valLoss"] < metrics["initialValLoss"]


    def test_without_validation_or_test_data_it_trains_and_says_so(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records(60))
        out = tmp_path / "out"

        code = _run(tmp_path, config(tiny_gpt2, train, out, dataset={"split": {"validation": 0.0, "test": 0.0}}))

        assert code == api_process.EXIT_OK
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["valLoss"] is None and metrics["results"] == {}
        assert metrics["data"]["splits"] == {"train": 60, "validation": 0, "test": 0}
        assert (out / "model" / "model.safetensors").is_file() and (out / "loss_curve.png").is_file()
        per_epoch = metrics["totalSteps"] // 2
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{per_epoch}", f"step-{2 * per_epoch}"]


class TestEarlyStopping:
    def test_stops_after_patience_evaluations_without_improvement(self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records())
        out = tmp_path / "out"
        # A learning rate this small cannot improve validation loss by minDelta, so the
        # first evaluation (step 1) is the best and steps 2 and 3 exhaust a patience of 2.
        content = config(
            tiny_gpt2, train, out,
            hyperparameters={"learningRate": 1e-9},
            training={"evalInterval": 1, "earlyStopping": {"enabled": True, "patience": 2, "minDelta": 0.5}},
        )

        assert _run(tmp_path, content) == api_process.EXIT_OK

        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["stoppedEarly"] is True
        assert metrics["step"] == 3 < metrics["totalSteps"]
        assert metrics["modelStep"] == 1  # the best checkpoint's weights are the saved model
        assert [e["step"] for e in metrics["history"]["evaluations"]] == [0, 1, 2, 3]


class TestPermanentErrors:
    """Bad input exits with 78 and a message naming the problem (stderr and termination log)."""

    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ("missing_field", "record 1: missing field 'text' (dataset.fields.text); fields present: body"),
            ("empty_after_cleaning", "no records left after cleaning: 2 read, 2 empty"),
            ("undecodable", "not UTF-8 text (undecodable byte at offset"),
            ("unknown_label", "unknown label 'maybe'"),
            ("missing_model", "model.source: /nonexistent/model: no such file or directory"),
            ("bad_config", "hyperparameters.learningRate: must be > 0 and <= 1, got -1"),
        ],
    )
    def test_exit_78_names_the_problem(
        self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path, capsys: pytest.CaptureFixture[str], case: str, expected: str
    ) -> None:
        train = tmp_path / "train.jsonl"
        content = config(tiny_gpt2, train, tmp_path / "out")
        if case == "missing_field":
            write_jsonl(train, [{"body": "text"}])
        elif case == "empty_after_cleaning":
            write_jsonl(train, [{"text": " "}, {"text": "\n"}])
        elif case == "undecodable":
            train.write_bytes(b'{"text": "\xff\xfe"}\n')
        elif case == "unknown_label":
            write_jsonl(train, classification_records(30) + [{"text": "hmm", "label": "maybe"}])
            content["dataset"] |= {"format": "classification", "labels": ["negative", "positive"]}
        elif case == "missing_model":
            write_jsonl(train, text_records(10))
            content["model"]["source"] = "/nonexistent/model"
        else:
            content["hyperparameters"]["learningRate"] = -1

        code = _run(tmp_path, content)

        assert code == api_process.EXIT_PERMANENT
        assert expected in capsys.readouterr().err
        summary = json.loads(termination_log.read_text())
        assert summary["outcome"] == "failed" and expected in summary["message"]

    def test_validate_only_checks_data_without_training(self, tmp_path: Path, tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
        train = write_jsonl(tmp_path / "train.jsonl", text_records(50) + [{"text": ""}])
        path = write_config(tmp_path / "c.json", config(tiny_gpt2, train, tmp_path / "out"))

        assert main(["--config", str(path), "--validate-only"]) == api_process.EXIT_OK

        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["statistics"]["cleaning"]["train"]["droppedEmpty"] == 1
        assert report["statistics"]["trainTokens"]["total"] > 0
        assert not (tmp_path / "out").exists()


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str | None, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers.get("Authorization"), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def report_server() -> Iterator[tuple[str, list[tuple[str | None, dict[str, Any]]]]]:
    received: list[tuple[str | None, dict[str, Any]]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/reports", received
    finally:
        server.shutdown()
        server.server_close()


class TestProgressReports:
    def test_reports_reach_a_local_http_server_with_the_token(
        self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch,
        report_server: tuple[str, list[tuple[str | None, dict[str, Any]]]], capsys: pytest.CaptureFixture[str],
    ) -> None:
        url, received = report_server
        monkeypatch.setenv(api_process.ENV_PROGRESS_URL, url)
        monkeypatch.setenv(api_process.ENV_PROGRESS_TOKEN, "s3cret")
        monkeypatch.setenv(api_process.ENV_ATTEMPT, "2")
        train = write_jsonl(tmp_path / "train.jsonl", text_records(150))
        content = config(tiny_gpt2, train, tmp_path / "out", job={"namespace": "team-a", "name": "tune", "uid": "u-1"})

        assert _run(tmp_path, content) == api_process.EXIT_OK

        kinds = [body["kind"] for _, body in received]
        assert kinds[0] == "started" and kinds[-1] == "completed"
        assert {"progress", "evaluation", "checkpoint"} <= set(kinds)
        assert {auth for auth, _ in received} == {"Bearer s3cret"}
        assert [body["seq"] for _, body in received] == list(range(1, len(received) + 1))
        assert all(body["job"] == {"namespace": "team-a", "name": "tune", "uid": "u-1"} and body["attempt"] == 2 for _, body in received)
        evaluation = next(body for _, body in received if body["kind"] == "evaluation")
        assert {"step", "totalSteps", "epoch", "valLoss", "valPerplexity", "learningRate", "tokensSeen"} <= set(evaluation)
        completed = received[-1][1]
        assert completed["model"]["digest"].startswith("sha256:") and "perplexity" in completed["results"]
        stdout_reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [r["seq"] for r in stdout_reports] == [body["seq"] for _, body in received]

    def test_an_unreachable_endpoint_does_not_stop_training(
        self, tmp_path: Path, tiny_gpt2: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(api_process.ENV_PROGRESS_URL, "http://127.0.0.1:9/unreachable")
        train = write_jsonl(tmp_path / "train.jsonl", text_records(60))

        assert _run(tmp_path, config(tiny_gpt2, train, tmp_path / "out")) == api_process.EXIT_OK
