"""Trainer throughput: kubetune's training loop vs a Hugging Face `Trainer` baseline, same run, same everything.

Both sides train the same freshly initialised GPT-2-shaped model (from the same
saved folder) for one epoch over the same variable-length examples (the same
token ids: the baseline gets kubetune's tokenised examples), with AdamW at the
same constant learning rate, weight decay (not on biases/norms on either side),
gradient clipping at 1.0 and about the same number of non-padding tokens per
batch; so both see exactly the same non-padding tokens.

- kubetune: `trainer.train.setup` + `trainer.train.fit` (the code path of
  `python -m kubetune.trainer`), packing on (best-fit-decreasing, position ids
  restarting per example, no cross-example attention).
- baseline: `transformers.Trainer` with `DataCollatorForLanguageModeling(mlm=False)`,
  which pads every batch to its longest example (the common default).

Measured: wall time of the training loop only (model loading and data
preparation excluded on both sides), non-padding tokens per second, the
fraction of computed positions that are padding, and validation loss on the
same held-out texts afterwards, computed for both models by the same function
(`trainer.evaluate.language_model_metrics`, dropout off). Sides alternate
(`--rounds`) so background load hits both alike; the ratio is of medians.

    python bench/trainer_throughput.py            # ~3-4 min on 2 CPU cores
    python bench/trainer_throughput.py --quick    # seconds: tiny model, few examples (smoke test)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import workload

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
SEED = 42


@dataclass
class SideResult:
    """One side's figures for one round."""

    name: str
    seconds: float
    cpu_seconds: float
    """CPU time of this process (all threads) in the loop: robust to other load on a shared machine."""
    real_tokens: int
    computed_positions: int
    steps: int
    val_loss: float

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.real_tokens / self.cpu_seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.computed_positions


def kubetune_config(model: Path, train: Path, output: Path, *, max_seq_length: int, batch_size: int,
                    precision: str) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "dataset": {"format": "text", "train": {"source": str(train)}, "split": {"validation": 0, "test": 0}},
        "method": {"type": "full"},
        "hyperparameters": {
            "epochs": 1, "batchSize": batch_size, "gradientAccumulationSteps": 1, "maxSeqLength": max_seq_length,
            "learningRate": LEARNING_RATE, "scheduler": "constant", "warmupRatio": 0, "weightDecay": WEIGHT_DECAY,
            "seed": SEED,
        },
        # No periodic checkpoints in the timed loop (the baseline saves none either).
        "training": {"precision": precision, "packing": True, "checkpointInterval": 1_000_000},
        "job": {"name": "bench-throughput"},
        "output": {"dir": str(output)},
    }


def prepare_kubetune(config_dict: dict[str, Any]) -> Any:
    """The trainer's own setup: data, tokenizer, model, packing, optimizer (not timed)."""
    from kubetune.trainer import config as cfg
    from kubetune.trainer import train
    from kubetune.trainer.__main__ import load_data

    config = cfg.config_from_dict(config_dict)
    tokenizer, prepared = load_data(config)
    return train.setup(config, prepared, tokenizer)


def packed_positions(run: Any) -> tuple[int, int]:
    """(real tokens, computed positions) of the epoch's micro-batches, as `evaluate.collate` pads them."""
    from kubetune.trainer import train

    sequences = train.epoch_sequences(run, 0)
    real = computed = 0
    for step in train._plan_for(run, 0)[: run.epoch_steps[0]]:
        for micro in step:
            lengths = [len(sequences[i].input_ids) for i in micro]
            real += sum(lengths)
            computed += max(lengths) * len(lengths)
    return real, computed


def run_kubetune(config_dict: dict[str, Any], validation: list[Any]) -> SideResult:
    from kubetune.trainer import train
    from kubetune.trainer.reporting import Reporter

    run = prepare_kubetune(config_dict)
    real, computed = packed_positions(run)
    reporter = Reporter(run.config.job, stream=io.StringIO())
    started, cpu_started = time.perf_counter(), time.process_time()
    state = train.fit(run, reporter)
    _sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert state.tokens_seen == real, (state.tokens_seen, real)
    model = run.accelerator.unwrap_model(run.model)
    return SideResult("kubetune", seconds, cpu_seconds, real, computed, state.step, validation_loss(model, validation, run.pad_id))


class CountingCollator:
    """Wraps the baseline's collator to count real tokens and padded positions."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.real = 0
        self.computed = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.computed += int(batch["attention_mask"].numel())
        return batch


def run_baseline(model_folder: Path, examples: list[list[int]], batch_size: int, scratch: Path,
                 validation: list[Any], precision: str) -> SideResult:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    dataset = [{"input_ids": ids} for ids in examples]
    args = TrainingArguments(
        output_dir=str(scratch / "hf"), per_device_train_batch_size=batch_size, num_train_epochs=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
        max_grad_norm=1.0, optim="adamw_torch", seed=SEED, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=workload.device_kind() == "cpu",
        bf16=precision == "bf16", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    started, cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train()
    _sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    pad_id = int(tokenizer.pad_token_id)
    return SideResult("HF Trainer", seconds, cpu_seconds, collator.real, collator.computed, int(output.global_step),
                      validation_loss(trainer.model, validation, pad_id))


def validation_loss(model: Any, validation: list[Any], pad_id: int) -> float:
    from kubetune.trainer import evaluate

    device = next(model.parameters()).device
    metrics = evaluate.language_model_metrics(model, validation, batch_size=8, pad_id=pad_id, device=device)
    return float(metrics["loss"])


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def validation_sequences(model: Path, texts: list[str], max_seq_length: int) -> list[Any]:
    from transformers import AutoTokenizer

    from kubetune.trainer import data

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokens = data.tokenize_examples([data.Example(completion=t) for t in texts], tokenizer)
    sequences, _ = data.pack(tokens, max_seq_length, packing=True, chunk_long=True)
    return sequences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke test, not a measurement")
    parser.add_argument("--examples", type=int, default=None, help="training examples (default 600; quick 120)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 2; quick 1)")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="kubetune micro-batch in packed sequences")
    args = parser.parse_args()
    shape = workload.QUICK_SHAPE if args.quick else workload.BENCH_SHAPE
    count = args.examples or (120 if args.quick else 600)
    rounds = args.rounds or (1 if args.quick else 2)
    precision = "bf16" if workload.device_kind() == "cuda" else "fp32"
    from kubetune.trainer import train

    print(f"hardware          {workload.hardware_line()}")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model = workload.create_bench_model(scratch / "model", shape)
        train_file = workload.write_jsonl(scratch / "train.jsonl", workload.instruction_like_texts(count, seed=1))
        validation = validation_sequences(model, workload.instruction_like_texts(max(40, count // 10), seed=2),
                                          args.max_seq_length)
        config_dict = kubetune_config(model, train_file, scratch / "out", max_seq_length=args.max_seq_length,
                                      batch_size=args.batch_size, precision=precision)
        probe = prepare_kubetune(config_dict)
        examples = [e.input_ids for e in probe.train_examples]
        real, _ = packed_positions(probe)
        micro_batches = sum(len(step) for step in train._plan_for(probe, 0)[: probe.epoch_steps[0]])
        mean_length = real / len(examples)
        baseline_batch = max(1, round(real / micro_batches / mean_length))
        lengths = sorted(len(e) for e in examples)
        print(f"model             {shape.describe()}, {probe.num_parameters / 1e6:.1f}M parameters, {precision}")
        print(f"data              {len(examples)} texts, {real} tokens; length median {lengths[len(lengths) // 2]},"
              f" mean {mean_length:.0f}, p95 {lengths[int(len(lengths) * 0.95)]}, max {lengths[-1]}")
        print(f"batches           kubetune {args.batch_size} packed x {args.max_seq_length} tokens"
              f" (~{real / micro_batches:.0f} real tokens); baseline {baseline_batch} examples"
              f" (~{baseline_batch * mean_length:.0f} real tokens); lr {LEARNING_RATE} constant, 1 epoch")
        del probe

        results: dict[str, list[SideResult]] = {"kubetune": [], "HF Trainer": []}
        for round_index in range(rounds):
            order = ["kubetune", "HF Trainer"] if round_index % 2 == 0 else ["HF Trainer", "kubetune"]
            for side in order:
                if side == "kubetune":
                    result = run_kubetune(config_dict, validation)
                else:
                    result = run_baseline(model, examples, baseline_batch, scratch, validation, precision)
                results[side].append(result)
                print(f"round {round_index + 1} {side:<11} {result.tokens_per_second:8.0f} tokens/s"
                      f"  {result.tokens_per_cpu_second:6.0f} tokens/CPU-s  {result.seconds:6.1f} s  {result.steps} steps  padding {result.padding_fraction:.1%}"
                      f"  val loss {result.val_loss:.4f}", flush=True)

    ours, theirs = results["kubetune"], results["HF Trainer"]
    ours_tps = statistics.median(r.tokens_per_second for r in ours)
    theirs_tps = statistics.median(r.tokens_per_second for r in theirs)
    ours_cpu = statistics.median(r.tokens_per_cpu_second for r in ours)
    theirs_cpu = statistics.median(r.tokens_per_cpu_second for r in theirs)
    print(f"kubetune          {ours_tps:.0f} non-padding tokens/s ({ours_cpu:.0f} per CPU-second), padding {ours[-1].padding_fraction:.1%},"
          f" val loss {statistics.median(r.val_loss for r in ours):.4f} after {ours[-1].real_tokens} tokens")
    print(f"HF Trainer        {theirs_tps:.0f} non-padding tokens/s ({theirs_cpu:.0f} per CPU-second), padding {theirs[-1].padding_fraction:.1%},"
          f" val loss {statistics.median(r.val_loss for r in theirs):.4f} after {theirs[-1].real_tokens} tokens")
    print(f"ratio             {ours_tps / theirs_tps:.2f}x non-padding tokens/s (wall), "
          f"{ours_cpu / theirs_cpu:.2f}x per CPU-second (target >= 1.3x)")
    print("RESULT " + json.dumps({
        "bench": "trainer_throughput", "quick": args.quick, "device": workload.device_kind(),
        "kubetuneTokensPerSecond": round(ours_tps, 1), "baselineTokensPerSecond": round(theirs_tps, 1),
        "ratio": round(ours_tps / theirs_tps, 3), "cpuTimeRatio": round(ours_cpu / theirs_cpu, 3),
        "kubetunePaddingFraction": round(ours[-1].padding_fraction, 4),
        "baselinePaddingFraction": round(theirs[-1].padding_fraction, 4),
        "kubetuneValLoss": round(statistics.median(r.val_loss for r in ours), 4),
        "baselineValLoss": round(statistics.median(r.val_loss for r in theirs), 4),
        "tokens": ours[-1].real_tokens,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
