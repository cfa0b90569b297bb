"""Exact resume: SIGTERM checkpoints and exits 75; the retry continues at the same step, no batch repeated."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune.api import config as cfg, process as api_process
from kubetune.trainer.training import train

from .trainer_runs import config, text_records, write_config, write_jsonl

pytestmark = pytest.mark.slow


def _trainer(config_path: Path, termination_log: Path) -> subprocess.Popen[str]:
    env = os.environ | {
        "KUBETUNE_PROGRESS_INTERVAL": "0",  # a progress line per step, so the test can aim its SIGTERM
        api_process.ENV_TERMINATION_LOG: str(termination_log),
    }
    env.pop(api_process.ENV_PROGRESS_URL, None)
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )


class TestEpochPlan:
    def test_every_sequence_once_per_epoch_in_a_seeded_order(self) -> None:
        plan = train.epoch_plan(23, seed=5, epoch=0, batch_size=2, accumulation=3, world_size=1)

        flat = [i for step in plan for micro in step for i in micro]
        assert sorted(flat) == list(range(23))
        assert len(plan) == 4  # 12 micro-batches, 3 per step
        assert plan == train.epoch_plan(23, seed=5, epoch=0, batch_size=2, accumulation=3, world_size=1)
        assert plan != train.epoch_plan(23, seed=5, epoch=1, batch_size=2, accumulation=3, world_size=1)

    def test_processes_share_each_step_equally(self) -> None:
        plan = train.epoch_plan(21, seed=0, epoch=0, batch_size=2, accumulation=2, world_size=2)

        assert all(len(step) % 2 == 0 for step in plan)
        assert [len(step) for step in plan] == [4, 4, 2]  # 11 micro-batches: the odd one out is dropped


class TestResumeAfterSigterm:
    def test_resumed_run_matches_the_uninterrupted_one_step_for_step(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        train_file = write_jsonl(tmp_path / "train.jsonl", text_records(300))
        settings = {"hyperparameters": {"epochs": 4, "batchSize": 2, "learningRate": 3e-3}, "training": {"evalInterval": 10}}
        reference = write_config(tmp_path / "a.json", config(tiny_gpt2, train_file, tmp_path / "a", **settings))
        interrupted = write_config(tmp_path / "b.json", config(tiny_gpt2, train_file, tmp_path / "b", **settings))

        assert _trainer(reference, tmp_path / "log-a").wait(timeout=300) == api_process.EXIT_OK

        process = _trainer(interrupted, tmp_path / "log-b")
        assert process.stdout is not None
        for line in process.stdout:
            report = json.loads(line)
            if report["kind"] == "progress" and report["step"] >= 7:
                process.send_signal(signal.SIGTERM)
                break
        process.stdout.read()
        assert process.wait(timeout=120) == api_process.EXIT_PREEMPTED
        assert json.loads((tmp_path / "log-b").read_text())["outcome"] == "preempted"
        (stopped_at, checkpoint), = [c for c in train.list_checkpoints(tmp_path / "b" / "checkpoints") if c[0] >= 7][-1:]
        assert not list((tmp_path / "b" / "checkpoints").glob(".tmp-*"))

        assert _trainer(interrupted, tmp_path / "log-b").wait(timeout=300) == api_process.EXIT_OK

        expected = json.loads((tmp_path / "a" / "metrics.json").read_text())
        resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
        assert stopped_at < expected["totalSteps"]
        assert resumed["resumedFrom"] == str(checkpoint)
        assert resumed["step"] == expected["step"] == expected["totalSteps"]
        steps = [s for s, _ in resumed["history"]["trainLoss"]]
        assert steps == list(range(1, expected["step"] + 1))  # no step repeated or skipped
        # Same batches in the same order, same dropout draws: the same loss at every step.
        assert [loss for _, loss in resumed["history"]["trainLoss"]] == pytest.approx(
            [loss for _, loss in expected["history"]["trainLoss"]], rel=1e-5
        )
        assert resumed["valLoss"] == pytest.approx(expected["valLoss"], rel=1e-5)
        assert resumed["tokensSeen"] == expected["tokensSeen"]


class TestCurriculum:
    def test_epochs_grow_from_the_shortest_examples_to_the_whole_set(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        from transformers import AutoTokenizer

        from kubetune.trainer.prep import data

        records = [{"text": "word " * (1 + i % 20)} for i in range(200)]
        train_file = write_jsonl(tmp_path / "train.jsonl", records)
        content = config(
            tiny_gpt2, train_file, tmp_path / "out",
            dataset={"curriculum": {"enabled": True, "startFraction": 0.25, "epochsToFull": 2}, "cleaning": {"dedupe": False}},
            hyperparameters={"epochs": 3, "batchSize": 1, "maxSeqLength": 128},
            training={"packing": False},
        )
        trainer_config = cfg.config_from_dict(content)
        prepared = data.prepare(trainer_config.dataset)

        run = train.setup(trainer_config, prepared, AutoTokenizer.from_pretrained(tiny_gpt2))

        first, second, third = (train.epoch_sequences(run, e) for e in range(3))
        assert run.statistics["packing"]["train"]["chunked"] == 0  # one sequence per example here
        assert len(first) == pytest.approx(0.25 * len(third), abs=1)
        assert len(second) == pytest.approx(0.625 * len(third), abs=1)
        all_lengths = sorted(len(s.input_ids) for s in third)
        assert sorted(len(s.input_ids) for s in first) == all_lengths[: len(first)]  # the shortest quarter
        assert run.epoch_steps == [len(first), len(second), len(third)]


class _RunsCodeWhenUnpickled:
    """What an attacker with write access to the output claim could leave as optimizer.pt."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


class TestCheckpointsFromTheClaim:
    """Resume state comes from a volume other pods may write: loading it must never run code."""

    def test_resume_state_round_trips_through_the_weights_only_loader(self, tmp_path: Path) -> None:
        train.seed_everything(7)
        torch.save(train._rng_state(), tmp_path / "rng.pt")
        expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

        train.seed_everything(99)
        train._set_rng_state(train._load_tensors_and_values(tmp_path / "rng.pt"))

        assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected

    def test_a_pickle_that_runs_code_is_refused_not_executed(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        train_file = write_jsonl(tmp_path / "train.jsonl", text_records(40))
        settings = {"hyperparameters": {"epochs": 1, "batchSize": 4}, "training": {"evalInterval": 3}}
        config_path = write_config(tmp_path / "c.json", config(tiny_gpt2, train_file, tmp_path / "out", **settings))
        assert _trainer(config_path, tmp_path / "log-1").wait(timeout=300) == api_process.EXIT_OK
        (_, latest), = train.list_checkpoints(tmp_path / "out" / "checkpoints")[-1:]
        marker = tmp_path / "code-ran"
        torch.save({"state": _RunsCodeWhenUnpickled(marker), "param_groups": []}, latest / "optimizer.pt")

        process = _trainer(config_path, tmp_path / "log-2")
        assert process.stdout is not None
        process.stdout.read()

        assert process.wait(timeout=300) == api_process.EXIT_PERMANENT
        assert not marker.exists(), "unpickling the checkpoint ran the attacker's code"
        summary = json.loads((tmp_path / "log-2").read_text())
        assert summary["outcome"] == "failed"
        assert f"checkpoint file {latest / 'optimizer.pt'} was refused" in summary["message"]
