"""Data-parallel scaling: tokens/s of the real trainer with 1 rank and with N ranks, same run, same global batch.

Each side is `python -m kubetune.trainer.launch --config FILE`, the trainer
container's own command, with `KUBETUNE_NUM_PROCESSES` set as the operator
sets it from the pod's GPU count: 1 rank, then N ranks (CPU: N = 2, gloo;
GPU: N = the visible GPUs, nccl). Both sides train the same GPT-2-shaped
model from the same initial weights on the same packed sequences with the
same global batch (the 1-rank side accumulates N micro-batches per step, the
N-rank side one each), so they do the same arithmetic; what differs is that N
devices share it, plus the all-reduce.

Measured: training tokens per second over the whole fit (the last progress
report's `tokensPerSecond`: every rank's tokens, from the first step to the
last; model loading and the final evaluation excluded), per side, over
`--reps` rounds with the order alternating (1 N, N 1, ...), printed as
min / median / max; the scaling efficiency is median(N ranks) / (N × median(1 rank)).

    python bench/distributed_scaling.py               # CPU: 1 vs 2 gloo ranks, 3 rounds
    python bench/distributed_scaling.py --quick       # tiny model, one round: a smoke test
    python bench/distributed_scaling.py --plan-only   # what bench/gpu_suite.sh --plan-only runs (as --quick)

On a 2-core machine, 2 CPU ranks share the cores the 1-rank side had to
itself (torch's intra-op threads): the efficiency there measures overhead,
not a speed-up. Figures with the machine and load average: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return int(listener.getsockname()[1])


def build_model(folder: Path, *, width: int, layers: int) -> Path:
    """A GPT-2-shaped model of the given size with the tiny model's tokenizer (deterministic weights)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kubetune.dev import tinymodel

    tinymodel.create_tiny_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_config(root: Path, model: Path, *, name: str, texts: int, seq_length: int, batch: int,
                 accumulation: int, epochs: float) -> Path:
    from kubetune.dev import tinymodel

    data = root / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(texts, seed=1)))
    config = {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(data)}, "split": {"validation": 0.0, "test": 0.05}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": epochs, "batchSize": batch, "gradientAccumulationSteps": accumulation,
                            "learningRate": 1e-3, "maxSeqLength": seq_length, "dropout": 0.0},
        "training": {"checkpointInterval": 1_000_000},
        "evaluation": {"baseline": False},
        "output": {"dir": str(root / name)},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def run_side(config: Path, processes: int, device: str, threads_per_rank: int = 1) -> dict[str, Any]:
    """One run of the launcher; its fit's tokens/s and steps."""
    env = os.environ | {"KUBETUNE_NUM_PROCESSES": str(processes), "KUBETUNE_DEVICE": device,
                        # Every rank of both sides gets the same threads (a single rank runs in the launcher's
                        # process, which would otherwise take every core; the launcher gives N ranks
                        # cores // N): efficiency is then per device, and on a loaded machine a 2-thread
                        # OpenMP rank can spin 10x slower than a 1-thread one (measured here).
                        "OMP_NUM_THREADS": str(threads_per_rank),
                        "MASTER_PORT": str(_free_port()), "KUBETUNE_PROGRESS_INTERVAL": "0",
                        "KUBETUNE_TERMINATION_LOG": str(config.with_suffix(".termination"))}
    for name in ("KUBETUNE_PROGRESS_URL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "KUBETUNE_NUM_NODES"):
        env.pop(name, None)
    out_dir = Path(json.loads(config.read_text())["output"]["dir"])
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)  # every round trains from the start, not from the last round's checkpoint
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kubetune.trainer.launch", "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{processes} rank(s) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    progress = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = [r for r in progress if r.get("kind") == "progress"][-1]
    return {"tokensPerSecond": float(last["tokensPerSecond"]), "steps": int(last["step"]),
            "tokens": int(last["tokensSeen"]), "wallSeconds": round(wall, 1)}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 1), "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data, one round (smoke test)")
    parser.add_argument("--plan-only", action="store_true", help="as --quick, on the CPU (bench/gpu_suite.sh)")
    parser.add_argument("--reps", type=int, default=3, help="rounds (each runs both sides)")
    parser.add_argument("--width", type=int, default=128, help="model width (n_embd)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--texts", type=int, default=800, help="training texts")
    parser.add_argument("--threads-per-rank", type=int, default=1, help="CPU threads of every rank (CPU runs)")
    args = parser.parse_args(argv)
    quick = args.quick or args.plan_only
    import torch

    gpus = torch.cuda.device_count() if not args.plan_only else 0
    if gpus == 1:  # nccl refuses two ranks on one GPU: there is nothing to scale across
        print("distributed_scaling: one GPU visible; measuring 1 vs 2 gloo ranks on the CPU instead")
        gpus = 0
    device = "gpu" if gpus else "cpu"
    ranks = gpus if gpus > 1 else 2
    reps = 1 if quick else args.reps
    width, layers, texts = (64, 2, 160) if quick else (args.width, args.layers, args.texts)
    seq_length, batch = (64, 2) if quick else (128, 4)
    with tempfile.TemporaryDirectory(prefix="distributed-scaling-") as tmp:
        root = Path(tmp)
        model = build_model(root / "model", width=width, layers=layers)
        configs = {1: write_config(root, model, name="one", texts=texts, seq_length=seq_length, batch=batch,
                                   accumulation=ranks, epochs=1),
                   ranks: write_config(root, model, name="many", texts=texts, seq_length=seq_length, batch=batch,
                                       accumulation=1, epochs=1)}
        runs: dict[int, list[dict[str, Any]]] = {1: [], ranks: []}
        for rep in range(reps):
            for side in ((1, ranks) if rep % 2 == 0 else (ranks, 1)):
                result = run_side(configs[side], side, device, args.threads_per_rank)
                runs[side].append(result)
                print(f"round {rep + 1}: {side} rank(s): {result['tokensPerSecond']:.1f} tokens/s over "
                      f"{result['steps']} steps ({result['tokens']} tokens), {result['wallSeconds']} s wall", flush=True)
    one = spread([r["tokensPerSecond"] for r in runs[1]])
    many = spread([r["tokensPerSecond"] for r in runs[ranks]])
    efficiency = many["median"] / (ranks * one["median"]) if one["median"] else 0.0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = torch.cuda.get_device_name(0) if gpus else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}; load average {load}")
    print(f"1 rank:  tokens/s min/median/max {one['min']} / {one['median']} / {one['max']}")
    print(f"{ranks} ranks: tokens/s min/median/max {many['min']} / {many['median']} / {many['max']}")
    print(f"scaling efficiency ({ranks} ranks vs {ranks} x 1 rank, medians): {efficiency:.3f}; "
          f"speed-up {many['median'] / one['median'] if one['median'] else 0:.2f}x")
    print("RESULT " + json.dumps({"device": device, "machine": machine, "loadAverage": load, "ranks": ranks,
                                  "reps": reps, "model": {"width": width, "layers": layers},
                                  "oneRank": one, "manyRanks": many, "efficiency": round(efficiency, 4),
                                  "sameSteps": runs[1][0]["steps"] == runs[ranks][0]["steps"],
                                  "sameTokens": runs[1][0]["tokens"] == runs[ranks][0]["tokens"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
