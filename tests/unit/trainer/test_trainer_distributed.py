"""Data-parallel training for real: `python -m kubetune.trainer.launch` starts 2 gloo ranks on CPU.

Tolerances: 2 ranks × accumulation 1 and 1 rank × accumulation 2 (same global batch, seed, data order,
dropout off) agree per step within rel 1e-4 over 24 steps; they differ only in how the same gradients
are summed (an all-reduce between processes instead of accumulation in one), which changes the last
bits of float32. Accumulation 2 × batch 2 and accumulation 1 × batch 4 agree within rel 1e-4 for the
same reason (packed sequences are all full, so the per-micro-batch token means average to the batch's).
`training.strategy: fsdp` on 2 ranks follows 1 rank within the same rel 1e-4 (TestFsdpAcrossRanks).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from kubetune.api import process as api_process
from kubetune.trainer import launch
from kubetune.trainer.training import train

from .trainer_runs import config, text_records, write_config, write_jsonl

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 12
"""300 tiny-corpus texts pack into 48 sequences of 64 tokens: 12 steps of 4 sequences."""


def _free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return int(listener.getsockname()[1])


def _launch(config_path: Path, processes: int, tmp: Path, *, stdout: Any = subprocess.DEVNULL,
            stderr: Any = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """The trainer container's command, as the operator writes its environment for `processes` devices."""
    env = os.environ | {
        api_process.ENV_NUM_PROCESSES: str(processes),
        api_process.ENV_DEVICE: "cpu",
        api_process.ENV_MASTER_PORT: str(_free_port()),
        api_process.ENV_TERMINATION_LOG: str(tmp / f"termination-{config_path.stem}"),
        "KUBETUNE_PROGRESS_INTERVAL": "0",
    }
    for name in (api_process.ENV_PROGRESS_URL, "RANK", "WORLD_SIZE", "LOCAL_RANK", api_process.ENV_NUM_NODES):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "kubetune.trainer.launch", "--config", str(config_path)],
                            stdout=stdout, stderr=stderr, text=True, env=env)


def _run(config_path: Path, processes: int, tmp: Path) -> dict[str, Any]:
    assert _launch(config_path, processes, tmp).wait(timeout=600) == api_process.EXIT_OK
    return dict(json.loads((Path(json.loads(config_path.read_text())["output"]["dir"]) / "metrics.json").read_text()))


def _losses(metrics: dict[str, Any]) -> list[float]:
    return [loss for _, loss in metrics["history"]["trainLoss"]]


def _config(tmp: Path, model: Path, name: str, *, batch: int, accumulation: int, **extra: Any) -> Path:
    train_file = tmp / "train.jsonl"
    if not train_file.exists():
        write_jsonl(train_file, text_records(300))
    hyper = {"epochs": 2, "batchSize": batch, "gradientAccumulationSteps": accumulation, "learningRate": 3e-3,
             "dropout": 0.0}  # dropout off: ranks draw their own masks, one process draws them in sequence
    sections: dict[str, Any] = {"hyperparameters": hyper, "training": {"evalInterval": 8}} | extra
    return write_config(tmp / f"{name}.json", config(model, train_file, tmp / name, **sections))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted 2-rank run (batch 2, accumulation 1: global batch 4), 24 steps."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    path = _config(tmp, tiny_gpt2, "two", batch=2, accumulation=1, training={"evalInterval": 8, "checkpointInterval": 5})
    return tmp, _run(path, 2, tmp)


class TestRankShards:
    def test_ranks_train_on_disjoint_shards_that_cover_each_sequence_once_per_epoch(self) -> None:
        plan = train.epoch_plan(48, seed=42, epoch=0, batch_size=2, accumulation=3, world_size=2)

        seen: list[int] = []
        for step in plan:
            first = [i for micro in train.rank_share(step, 0, 2) for i in micro]
            second = [i for micro in train.rank_share(step, 1, 2) for i in micro]
            assert not set(first) & set(second)
            assert len(first) == len(second)  # equal shares: no rank waits at the all-reduce
            seen += first + second
        assert sorted(seen) == list(range(48))

    def test_each_rank_holds_its_share_of_the_global_batch(self) -> None:
        step = train.epoch_plan(48, seed=1, epoch=0, batch_size=2, accumulation=2, world_size=3)[0]

        shares = [train.rank_share(step, rank, 3) for rank in range(3)]
        assert [len(s) for s in shares] == [2, 2, 2]  # accumulation micro-batches each
        assert sum(len(micro) for share in shares for micro in share) == 2 * 3 * 2  # batch × world × accumulation


class TestLaunchEnvironment:
    def test_the_world_comes_from_the_variables_the_operator_writes(self) -> None:
        world = launch.world_from_environment({api_process.ENV_NUM_PROCESSES: "8", api_process.ENV_NUM_NODES: "2",
                                               api_process.ENV_NODE_RANK: "1", api_process.ENV_MASTER_ADDR: "job-0.job",
                                               api_process.ENV_DEVICE: "gpu"})

        assert (world.size, world.node_rank, world.master_addr, world.master_port) == (16, 1, "job-0.job", 29500)
        command = launch.launch_command(world, ["--config", "c.json"])
        assert command[command.index("--num_processes") + 1] == "16"
        assert command[command.index("--num_machines") + 1] == "2"
        assert command[command.index("--machine_rank") + 1] == "1"
        assert command[command.index("--max_restarts") + 1] == "0"
        assert command[-4:] == ["-m", "kubetune.trainer", "--config", "c.json"]
        assert "ACCELERATE_USE_CPU" not in launch.launch_environment(world, {}, "/tmp/x")
        assert launch.launch_environment(launch.World(processes_per_node=2), {}, "/tmp/x")["ACCELERATE_USE_CPU"] == "true"

    @pytest.mark.parametrize(("env", "named"), [
        ({api_process.ENV_NUM_PROCESSES: "0"}, api_process.ENV_NUM_PROCESSES),
        ({api_process.ENV_NUM_NODES: "two"}, api_process.ENV_NUM_NODES),
        ({api_process.ENV_NUM_NODES: "2", api_process.ENV_NODE_RANK: "2"}, api_process.ENV_NODE_RANK),
        ({api_process.ENV_DEVICE: "tpu"}, api_process.ENV_DEVICE),
    ])
    def test_a_bad_variable_is_named(self, env: dict[str, str], named: str) -> None:
        with pytest.raises(launch.LaunchError, match=named):
            launch.world_from_environment(env)

    def test_the_pod_exits_with_the_most_specific_rank_code(self) -> None:
        assert launch.combined_exit_code([0, api_process.EXIT_PERMANENT], 1) == api_process.EXIT_PERMANENT
        assert launch.combined_exit_code([api_process.EXIT_PREEMPTED, api_process.EXIT_PREEMPTED], 143) == api_process.EXIT_PREEMPTED
        assert launch.combined_exit_code([0, 0], 0) == 0
        assert launch.combined_exit_code([], -9) == 1  # a rank killed before it could record: retryable


class TestTwoRanksMatchOne:
    def test_two_ranks_follow_one_rank_with_the_same_global_batch(self, two_ranks: tuple[Path, dict[str, Any]],
                                                                  tmp_path: Path, tiny_gpt2: Path) -> None:
        tmp, distributed = two_ranks
        single = _run(_config(tmp_path, tiny_gpt2, "one", batch=2, accumulation=2), 1, tmp_path)

        assert distributed["totalSteps"] == single["totalSteps"] == 2 * STEPS_PER_EPOCH
        assert len(_losses(distributed)) >= 20
        assert _losses(distributed) == pytest.approx(_losses(single), rel=1e-4)
        assert _losses(distributed)[-1] < _losses(distributed)[0] - 0.5  # it trained
        assert distributed["device"] == "2x cpu"
        assert distributed["hyperparameters"]["worldSize"] == 2
        assert distributed["hyperparameters"]["globalBatchSize"] == single["hyperparameters"]["globalBatchSize"] == 4
        assert distributed["tokensSeen"] == single["tokensSeen"]

    def test_rank_zero_alone_writes_the_model_and_the_summary(self, two_ranks: tuple[Path, dict[str, Any]]) -> None:
        tmp, distributed = two_ranks
        out = tmp / "two"

        assert len(list(out.glob("**/config.json"))) == 1  # one model folder, not one per rank
        assert not list((out / "checkpoints").glob(".tmp-*"))
        summary = json.loads((tmp / "termination-two").read_text())
        assert summary["outcome"] == "succeeded" and summary["step"] == distributed["step"]


class TestTwoPods:
    def test_two_pods_of_one_rank_meet_at_pod_zero_and_train_as_one_world(
            self, two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_gpt2: Path) -> None:
        """Two launchers as the Indexed Job's two pods would run them: the same MASTER_ADDR/PORT (pod 0;
        here loopback, as the local node gives pods no DNS), JOB_COMPLETION_INDEX 0 and 1, one shared
        output folder. They form one world of 2 and train exactly as 2 ranks in one pod."""
        _, reference = two_ranks
        path = _config(tmp_path, tiny_gpt2, "two", batch=2, accumulation=1, training={"evalInterval": 8})
        port = str(_free_port())
        pods = []
        for index in (0, 1):
            env = os.environ | {api_process.ENV_NUM_PROCESSES: "1", api_process.ENV_NUM_NODES: "2", api_process.ENV_NODE_RANK: str(index),
                                api_process.ENV_DEVICE: "cpu", api_process.ENV_MASTER_ADDR: "127.0.0.1", api_process.ENV_MASTER_PORT: port,
                                api_process.ENV_TERMINATION_LOG: str(tmp_path / f"termination-pod-{index}")}
            env.pop(api_process.ENV_PROGRESS_URL, None)
            pods.append(subprocess.Popen([sys.executable, "-m", "kubetune.trainer.launch", "--config", str(path)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))

        assert [pod.wait(timeout=600) for pod in pods] == [api_process.EXIT_OK, api_process.EXIT_OK]
        metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
        assert metrics["hyperparameters"]["worldSize"] == 2
        assert _losses(metrics) == pytest.approx(_losses(reference), rel=1e-5)
        assert len(list((tmp_path / "two").glob("**/config.json"))) == 1
        assert (tmp_path / "termination-pod-0").exists() and not (tmp_path / "termination-pod-1").exists()


class TestAccumulation:
    def test_accumulation_equals_the_same_global_batch_in_one_micro_batch(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        accumulated = _run(_config(tmp_path, tiny_gpt2, "acc", batch=2, accumulation=2), 1, tmp_path)
        whole = _run(_config(tmp_path, tiny_gpt2, "whole", batch=4, accumulation=1), 1, tmp_path)

        assert accumulated["totalSteps"] == whole["totalSteps"] >= 20
        assert _losses(accumulated) == pytest.approx(_losses(whole), rel=1e-4)


class TestMixedPrecisionOnCpu:
    def test_bf16_autocast_trains_on_cpu_and_rounds_like_bf16(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        full = _run(_config(tmp_path, tiny_gpt2, "fp32", batch=4, accumulation=1,
                            training={"evalInterval": 8, "precision": "fp32"}), 1, tmp_path)
        half = _run(_config(tmp_path, tiny_gpt2, "bf16", batch=4, accumulation=1,
                            training={"evalInterval": 8, "precision": "bf16"}), 1, tmp_path)

        # bf16 keeps 8 bits of mantissa: the losses follow fp32 closely but not to the last bit.
        assert _losses(half) == pytest.approx(_losses(full), rel=5e-2)
        assert _losses(half) != pytest.approx(_losses(full), rel=1e-6)
        assert _losses(half)[-1] < _losses(half)[0] - 0.5


class TestRankFailure:
    def test_sigkill_of_rank_one_fails_the_attempt_and_the_retry_resumes_exactly(
            self, two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_gpt2: Path) -> None:
        _, reference = two_ranks
        path = _config(tmp_path, tiny_gpt2, "two", batch=2, accumulation=1,
                       training={"evalInterval": 8, "checkpointInterval": 5})

        # Other fixtures of the session (a control plane, an object store) are children of pytest too.
        already = {p.pid for p in psutil.Process().children(recursive=True)}
        process = _launch(path, 2, tmp_path, stdout=subprocess.PIPE)
        assert process.stdout is not None
        for line in process.stdout:
            report = json.loads(line) if line.startswith("{") else {}
            if report.get("kind") == "progress" and report["step"] >= 13:  # mid-epoch 2, after step 10's checkpoint
                rank_one = [p for p in psutil.Process(process.pid).children(recursive=True)
                            if p.environ().get("RANK") == "1"]
                assert len(rank_one) == 1
                rank_one[0].send_signal(signal.SIGKILL)
                break
        process.stdout.read()
        code = process.wait(timeout=120)
        assert code not in (api_process.EXIT_OK, api_process.EXIT_PERMANENT)  # retryable: the Job starts the attempt again
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in already]
        assert not left  # no rank left behind
        checkpoints = [step for step, _ in train.list_checkpoints(tmp_path / "two" / "checkpoints")]
        assert checkpoints and max(checkpoints) < reference["totalSteps"]

        resumed = _run(path, 2, tmp_path)

        assert resumed["resumedFrom"] == str(tmp_path / "two" / "checkpoints" / f"step-{max(checkpoints)}")
        assert [s for s, _ in resumed["history"]["trainLoss"]] == list(range(1, reference["totalSteps"] + 1))
        assert _losses(resumed) == pytest.approx(_losses(reference), rel=1e-5)
        assert resumed["valLoss"] == pytest.approx(reference["valLoss"], rel=1e-5)


class TestFsdpNeedsAWrappableModel:
    def test_validation_refuses_fsdp_for_a_model_class_without_blocks_naming_the_field(
            self, tmp_path: Path, tiny_gpt2: Path) -> None:
        # The tiny GPT-2's files, declared as an OpenAI GPT: a transformers class with no _no_split_modules.
        import shutil

        model = tmp_path / "openai-gpt"
        shutil.copytree(tiny_gpt2, model)
        shape = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({
            "model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], "vocab_size": shape["vocab_size"],
            "n_positions": shape["n_positions"], "n_embd": shape["n_embd"], "n_layer": shape["n_layer"],
            "n_head": shape["n_head"]}))
        path = _config(tmp_path, model, "fsdp", batch=2, accumulation=1, training={"strategy": "fsdp"})
        env = os.environ | {api_process.ENV_TERMINATION_LOG: str(tmp_path / "termination")}

        result = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(path), "--validate-only"],
                                env=env, capture_output=True, text=True, timeout=300)

        assert result.returncode == api_process.EXIT_PERMANENT
        summary = json.loads((tmp_path / "termination").read_text())
        assert summary["outcome"] == "failed"
        assert summary["message"].startswith("training.strategy: fsdp cannot wrap OpenAIGPTLMHeadModel")

    def test_validation_accepts_fsdp_for_a_model_that_names_its_blocks(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        path = _config(tmp_path, tiny_gpt2, "fsdp", batch=2, accumulation=1, training={"strategy": "fsdp"})
        env = os.environ | {api_process.ENV_TERMINATION_LOG: str(tmp_path / "termination")}

        result = subprocess.run([sys.executable, "-m", "kubetune.trainer", "--config", str(path), "--validate-only"],
                                env=env, capture_output=True, text=True, timeout=300)

        assert result.returncode == api_process.EXIT_OK, result.stderr[-2000:]


@pytest.fixture(scope="module")
def fsdp_two_ranks(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted 2-rank FSDP run, otherwise `two_ranks`' config (global batch 4, 24 steps)."""
    tmp = tmp_path_factory.mktemp("fsdp-two-ranks")
    path = _config(tmp, tiny_gpt2, "fsdp", batch=2, accumulation=1,
                   training={"evalInterval": 8, "checkpointInterval": 5, "strategy": "fsdp"})
    return tmp, _run(path, 2, tmp)


class TestFsdpAcrossRanks:
    """Tolerances: FSDP on 2 ranks and 1 rank with accumulation 2 compute the same gradients, summed in a
    different order (a reduce-scatter of shards instead of accumulation in one process): per-step losses
    agree within rel 1e-4 over 24 steps, like DDP's; the saved weights within abs 1e-4."""

    def test_two_fsdp_ranks_follow_one_rank_with_the_same_global_batch(
            self, fsdp_two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_gpt2: Path) -> None:
        tmp, sharded = fsdp_two_ranks
        single = _run(_config(tmp_path, tiny_gpt2, "one", batch=2, accumulation=2), 1, tmp_path)

        assert sharded["totalSteps"] == single["totalSteps"] == 2 * STEPS_PER_EPOCH
        assert _losses(sharded) == pytest.approx(_losses(single), rel=1e-4)
        assert _losses(sharded)[-1] < _losses(sharded)[0] - 0.5  # it trained
        assert sharded["device"] == "2x cpu" and sharded["hyperparameters"]["worldSize"] == 2
        assert sharded["tokensSeen"] == single["tokensSeen"]
        assert sharded["valLoss"] == pytest.approx(single["valLoss"], rel=1e-4)
        assert sharded["results"]["loss"] == pytest.approx(single["results"]["loss"], rel=1e-4)

        # The saved model is a plain transformers folder with the weights one process trains.
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        sharded_folder = Path(sharded["model"]["uri"])
        assert len(list((tmp / "fsdp").glob("**/config.json"))) == 1  # rank 0 alone wrote it
        model = AutoModelForCausalLM.from_pretrained(sharded_folder)
        assert sum(p.numel() for p in model.parameters()) == sharded["parameters"]["total"]
        mine, theirs = load_file(str(sharded_folder / "model.safetensors")), load_file(
            str(Path(single["model"]["uri"]) / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        for name, tensor in theirs.items():
            assert mine[name].shape == tensor.shape, name
            assert torch.allclose(mine[name], tensor, atol=1e-4, rtol=0), name

    def test_a_checkpoint_holds_full_tensors_and_the_optimizer_state_by_name(
            self, fsdp_two_ranks: tuple[Path, dict[str, Any]]) -> None:
        from safetensors.torch import load_file

        tmp, sharded = fsdp_two_ranks
        checkpoints = train.list_checkpoints(tmp / "fsdp" / "checkpoints")
        assert checkpoints
        _, latest = checkpoints[-1]
        weights = load_file(str(latest / "trainable.safetensors"))
        assert sum(t.numel() for t in weights.values()) == sharded["parameters"]["trainable"]  # not a shard
        optimizer = torch.load(latest / "optimizer.pt", weights_only=True)
        assert set(optimizer["state"]) <= set(weights)  # keyed by parameter name
        first = next(iter(optimizer["state"]))
        assert optimizer["state"][first]["exp_avg"].shape == weights[first].shape

    def test_sigterm_stops_at_a_checkpoint_and_the_resumed_run_continues_exactly(
            self, fsdp_two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_gpt2: Path) -> None:
        _, reference = fsdp_two_ranks
        path = _config(tmp_path, tiny_gpt2, "fsdp", batch=2, accumulation=1,
                       training={"evalInterval": 8, "checkpointInterval": 5, "strategy": "fsdp"})

        process = _launch(path, 2, tmp_path, stdout=subprocess.PIPE)
        assert process.stdout is not None
        for line in process.stdout:
            report = json.loads(line) if line.startswith("{") else {}
            if report.get("kind") == "progress" and report["step"] >= 13:  # mid-epoch 2, after step 10's checkpoint
                process.send_signal(signal.SIGTERM)  # the kubelet's preemption signal, to the launcher
                break
        process.stdout.read()
        assert process.wait(timeout=300) == api_process.EXIT_PREEMPTED
        checkpoints = [step for step, _ in train.list_checkpoints(tmp_path / "fsdp" / "checkpoints")]
        assert checkpoints and max(checkpoints) < reference["totalSteps"]

        resumed = _run(path, 2, tmp_path)

        assert resumed["resumedFrom"] == str(tmp_path / "fsdp" / "checkpoints" / f"step-{max(checkpoints)}")
        assert [s for s, _ in resumed["history"]["trainLoss"]] == list(range(1, reference["totalSteps"] + 1))
        assert _losses(resumed) == pytest.approx(_losses(reference), rel=1e-5)
        assert resumed["valLoss"] == pytest.approx(reference["valLoss"], rel=1e-5)

    def test_sigterm_to_one_rank_only_stops_every_rank_after_the_same_step(
            self, fsdp_two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path, tiny_gpt2: Path) -> None:
        """Each process gets the signal at its own moment; here only rank 1 gets it. The ranks agree at each
        step boundary, so rank 0 stops after the same step and both checkpoint together (before, rank 0 went
        on into the next step's all-gathers while rank 1 checkpointed, and the attempt hung)."""
        _, reference = fsdp_two_ranks
        path = _config(tmp_path, tiny_gpt2, "fsdp-one", batch=2, accumulation=1,
                       training={"evalInterval": 8, "checkpointInterval": 5, "strategy": "fsdp"})

        log = tmp_path / "ranks.log"
        with log.open("w") as stderr:
            process = _launch(path, 2, tmp_path, stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        for line in process.stdout:
            report = json.loads(line) if line.startswith("{") else {}
            if report.get("kind") == "progress" and report["step"] >= 3:
                ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
                         if child.environ().get("RANK") == "1" and child.environ().get("LOCAL_RANK") == "1"]
                assert len(ranks) == 1, ranks
                ranks[0].send_signal(signal.SIGTERM)
                break
        process.stdout.read()
        assert process.wait(timeout=300) == api_process.EXIT_PREEMPTED, log.read_text()[-6000:]
        checkpoints = [step for step, _ in train.list_checkpoints(tmp_path / "fsdp-one" / "checkpoints")]
        assert checkpoints and max(checkpoints) < reference["totalSteps"]

        resumed = _run(path, 2, tmp_path)

        assert [s for s, _ in resumed["history"]["trainLoss"]] == list(range(1, reference["totalSteps"] + 1))
        assert _losses(resumed) == pytest.approx(_losses(reference), rel=1e-5)

    @pytest.mark.parametrize("setting", [{"gradientCheckpointing": True}, {"compile": True},
                                         {"precision": "bf16"}], ids=["checkpointing", "compile", "bf16"])
    def test_training_settings_hold_under_fsdp(self, setting: dict[str, Any], fsdp_two_ranks: tuple[Path, dict[str, Any]],
                                               tmp_path: Path, tiny_gpt2: Path) -> None:
        """Activation checkpointing (recomputes, same numbers), torch.compile of the blocks (inductor on the
        CPU, same numbers within fp32 reordering) and bf16 autocast, each on 2 FSDP ranks: the run ends,
        follows the uninterrupted fp32 FSDP run (bf16: within its precision), and saves the whole model."""
        _, reference = fsdp_two_ranks
        name = "fsdp-" + "-".join(setting)
        result = _run(_config(tmp_path, tiny_gpt2, name, batch=2, accumulation=1,
                              training={"evalInterval": 8, "checkpointInterval": 5, "strategy": "fsdp", **setting}),
                      2, tmp_path)

        tolerance = 2e-2 if setting.get("precision") == "bf16" else 1e-4
        assert _losses(result) == pytest.approx(_losses(reference), rel=tolerance)
        assert _losses(result)[-1] < _losses(result)[0] - 0.2  # it trained
        assert (Path(result["model"]["uri"]) / "model.safetensors").exists()

    def test_lora_adapters_train_sharded_and_save_as_an_adapter(self, tmp_path: Path, tiny_gpt2: Path) -> None:
        lora = {"type": "lora", "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}  # ranks draw their own masks
        sharded = _run(_config(tmp_path, tiny_gpt2, "lora-fsdp", batch=2, accumulation=1, method=lora,
                               training={"evalInterval": 8, "strategy": "fsdp"}), 2, tmp_path)
        single = _run(_config(tmp_path, tiny_gpt2, "lora-one", batch=2, accumulation=2, method=lora), 1, tmp_path)

        assert _losses(sharded) == pytest.approx(_losses(single), rel=1e-4)
        assert _losses(sharded)[-1] < _losses(sharded)[0] - 0.2  # the adapters trained (6.18 -> 5.86 here)
        assert sharded["parameters"]["trainable"] == single["parameters"]["trainable"] < sharded["parameters"]["total"]
        # lora.merge (the default): the adapters gathered, merged into the base and saved whole.
        from safetensors.torch import load_file

        mine = load_file(str(Path(sharded["model"]["uri"]) / "model.safetensors"))
        theirs = load_file(str(Path(single["model"]["uri"]) / "model.safetensors"))
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[name], tensor, atol=1e-4, rtol=0) for name, tensor in theirs.items())
