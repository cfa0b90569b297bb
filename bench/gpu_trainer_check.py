"""The trainer container's own command on a GPU: fp16 with a gradient scaler, accumulation, resume after SIGTERM.

Every run is `python -m kubetune.trainer.launch --config FILE` with
`KUBETUNE_NUM_PROCESSES=1` and `KUBETUNE_DEVICE=gpu`, as the operator starts it
on a one-GPU pod, on the tiny models (the point is the code path, not speed):

1. fp16, full fine-tuning of the tiny GPT-2, gradient accumulation 2: accelerate's
   gradient scaler is in the loop (the trainer's `precision` is "fp16"), no
   step's loss is NaN or infinite, and the loss falls.
2. Resume: run 1's settings with a checkpoint every 4 steps, stopped by SIGTERM after its
   first checkpoint (what a preempted pod receives), then started again: the second
   process resumes from the checkpoint it saved and finishes with the same per-step losses as
   run 1 (fp16 on a GPU: a tolerance of 1e-3, stated).
3. With `--lora`, also bf16 LoRA on the tiny Llama, packed (bench/gpu_mfu.py's LoRA part already
   trains LoRA in bf16 through the trainer on a GPU, so the suite leaves it out).

Prints one line per check and `RESULT {json}`; exits 1 when a check fails.
`--plan-only` runs the same steps on the CPU with fp32 (bf16 for the LoRA run): a unit test runs it.
On the H200 lent here each trainer process took ~30 s (start-up, CUDA, a few steps).

    python bench/gpu_trainer_check.py              # on a GPU: ~1.5 minutes
    python bench/gpu_trainer_check.py --plan-only  # CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESUME_TOLERANCE = 1e-3
"""Largest difference between a resumed run's per-step losses and an uninterrupted run's."""


def write_config(root: Path, name: str, model: Path, data: Path, *, lora: bool, precision: str,
                 checkpoint_interval: int = 1_000_000) -> Path:
    config = {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(data)}, "split": {"validation": 0.1, "test": 0.05}},
        "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}} if lora else {"type": "full"},
        "hyperparameters": {"epochs": 2, "batchSize": 4, "gradientAccumulationSteps": 2, "learningRate": 1e-3,
                            "maxSeqLength": 64, "dropout": 0.0, "seed": 7, "scheduler": "constant",
                            "warmupRatio": 0},
        "training": {"precision": precision, "packing": True, "checkpointInterval": checkpoint_interval},
        "evaluation": {"baseline": False},
        "job": {"name": name},
        "output": {"dir": str(root / name)},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def launch(config: Path, device: str, *, stop_after_checkpoint: bool = False) -> dict[str, Any]:
    """One trainer process tree; its progress records, exit code and wall time. With `stop_after_checkpoint`,
    SIGTERM as soon as the first checkpoint is reported (the trainer saves and exits as on preemption)."""
    env = os.environ | {"KUBETUNE_NUM_PROCESSES": "1", "KUBETUNE_DEVICE": device, "KUBETUNE_PROGRESS_INTERVAL": "0",
                        "KUBETUNE_TERMINATION_LOG": str(config.with_suffix(".termination"))}
    for name in ("KUBETUNE_PROGRESS_URL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "KUBETUNE_NUM_NODES"):
        env.pop(name, None)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.trainer.launch", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    assert proc.stdout is not None
    records, stopped = [], False
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        records.append(record)
        if stop_after_checkpoint and not stopped and record.get("checkpoint"):
            os.killpg(proc.pid, signal.SIGTERM)
            stopped = True
    stderr = proc.stderr.read() if proc.stderr else ""
    code = proc.wait()
    return {"records": records, "exit": code, "seconds": round(time.monotonic() - started, 1), "stderr": stderr[-3000:],
            "stopped": stopped}


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["trainLoss"]) for r in records if r.get("kind") == "progress" and "trainLoss" in r}


def check_run(name: str, run: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    losses = step_losses(run["records"])
    ordered = [losses[s] for s in sorted(losses)]
    finite = all(math.isfinite(v) for v in ordered)
    falls = len(ordered) >= 4 and sum(ordered[-2:]) < sum(ordered[:2])
    completed = any(r.get("kind") == "completed" for r in run["records"])
    if run["exit"] != 0 or not completed:
        failures.append(f"{name}: exit {run['exit']}, completed {completed}: {run['stderr'][-1500:]}")
    elif not finite or not falls:
        failures.append(f"{name}: losses finite {finite}, falling {falls}: {ordered}")
    summary = {"exit": run["exit"], "seconds": run["seconds"], "steps": len(ordered),
               "firstLoss": ordered[0] if ordered else None, "lastLoss": ordered[-1] if ordered else None,
               "finite": finite, "falls": falls}
    print(f"{name:<8} exit {run['exit']} in {run['seconds']} s: {len(ordered)} steps, loss "
          f"{summary['firstLoss']} -> {summary['lastLoss']}, finite {finite}, falls {falls}", flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-only", action="store_true", help="the same runs on the CPU (fp32; a unit test)")
    parser.add_argument("--lora", action="store_true", help="also a bf16 LoRA run on the tiny Llama")
    args = parser.parse_args()
    import torch

    from kubetune.dev import tinymodel

    cuda = torch.cuda.is_available() and not args.plan_only
    if not cuda and not args.plan_only:
        raise SystemExit("gpu_trainer_check: no GPU here; --plan-only runs the same steps on the CPU")
    device = "gpu" if cuda else "cpu"
    full_precision = "fp16" if cuda else "fp32"
    failures: list[str] = []
    result: dict[str, Any] = {"bench": "gpu_trainer_check", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                              "planOnly": args.plan_only}
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as tmp:
        root = Path(tmp)
        gpt2, llama = root / "gpt2", root / "llama"
        tinymodel.create_tiny_model(gpt2, arch="gpt2")
        if args.lora:
            tinymodel.create_tiny_model(llama, arch="llama")
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodel.default_corpus(240, seed=3)))

        full = launch(write_config(root, "full", gpt2, data, lora=False, precision=full_precision), device)
        result["full"] = {"precision": full_precision, **check_run("full", full, failures)}
        if args.lora:
            lora = launch(write_config(root, "lora", llama, data, lora=True, precision="bf16"), device)
            result["lora"] = {"precision": "bf16", **check_run("lora", lora, failures)}
            if not any((root / "lora").rglob("adapter_model.safetensors")):
                failures.append("lora: no adapter_model.safetensors written")

        config = write_config(root, "resume", gpt2, data, lora=False, precision=full_precision, checkpoint_interval=4)
        first = launch(config, device, stop_after_checkpoint=True)
        second = launch(config, device)
        resumed_from = [r for r in second["records"] if r.get("kind") == "started"]
        reference, resumed = step_losses(full["records"]), step_losses(first["records"]) | step_losses(second["records"])
        common = sorted(set(reference) & set(resumed))
        worst = max((abs(reference[s] - resumed[s]) for s in common), default=math.inf)
        first_step_after = min(step_losses(second["records"]), default=None)
        result["resume"] = {"stopped": first["stopped"], "firstExit": first["exit"], "secondExit": second["exit"],
                            "firstStepAfterResume": first_step_after, "stepsCompared": len(common),
                            "maxLossDifference": worst, "tolerance": RESUME_TOLERANCE,
                            "startedRecords": len(resumed_from)}
        print(f"resume   stopped {first['stopped']} (exit {first['exit']}), resumed at step {first_step_after} "
              f"(exit {second['exit']}): {len(common)} steps compared, max |loss - uninterrupted| {worst:.2e} "
              f"(tolerance {RESUME_TOLERANCE})", flush=True)
        if not first["stopped"] or second["exit"] != 0 or first_step_after in (None, 1):
            failures.append(f"resume: stopped {first['stopped']}, second exit {second['exit']}, first step after "
                            f"resume {first_step_after}: {second['stderr'][-1500:]}")
        elif len(common) < len(reference) or worst > RESUME_TOLERANCE:
            failures.append(f"resume: {len(common)} of {len(reference)} steps, max difference {worst}")
    result["failures"] = failures
    for failure in failures:
        print("FAILED " + failure, flush=True)
    print("RESULT " + json.dumps(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
