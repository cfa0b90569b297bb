"""Trainer throughput: kubetune against what a user would pick instead, same run, same tokens, same settings.

Sides (each run in its own Python process, the order reversed every other
round, A B C D D C B A ..., so that background load and warm caches hit all
sides alike):

- kubetune: `trainer.train.setup` + `trainer.train.fit`, the code path of
  `python -m kubetune.trainer` (best-fit-decreasing packing, position ids
  restarting per example, fused linear cross-entropy).
- TRL SFTTrainer: `SFTConfig(packing=True, packing_strategy="bfd")`, TRL's
  recommended packing (the same best-fit-decreasing algorithm, padding-free
  batches with position ids); activation checkpointing off like the other
  sides (TRL's own default turns it on).
- HF Trainer + flattening: `transformers.Trainer` with
  `DataCollatorWithFlattening` (padding-free: each batch is one row of
  concatenated examples with position ids).
- HF Trainer padded (side row, not a peer): `DataCollatorForLanguageModeling`,
  which pads every batch to its longest example. No competent user would
  choose it for variable-length data; kept to show what padding costs.

Every side trains the same freshly initialised GPT-2-shaped model (one saved
folder) for one epoch on exactly the same token sequences (kubetune's
tokenisation, long texts cut to `--max-seq-length` as kubetune cuts them), with
AdamW at the same constant learning rate, weight decay (not on biases and
norms), gradient clipping at 1.0, the same precision and about the same number
of non-padding tokens per optimizer step. Timed: the training loop only (model
loading, dataset preparation and packing are excluded on every side).
Measured: non-padding tokens per second, per CPU-second of the process (robust
to other load on a shared machine), the fraction of computed positions that
are padding, and the validation loss of the trained model on the same held-out
texts, computed for every side by the same function. Each figure is printed
as min / median / max over the rounds; ratios are of medians.

    python bench/trainer_throughput.py            # 3 rounds of 4 sides: ~45 min on 2 CPU cores at load average ~20
    python bench/trainer_throughput.py --quick    # tiny model and data, one round: a smoke test
    python bench/trainer_throughput.py --shape gpt2-124m --examples 20000 --max-seq-length 1024 --batch-size 8
                                                  # a GPU (bench/gpu_suite.sh)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import workload

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
SEED = 42
KUBETUNE = "kubetune"
TRL = "TRL SFTTrainer"
FLATTENING = "HF Trainer+flattening"
PADDED = "HF Trainer padded"
SIDES = (KUBETUNE, TRL, FLATTENING, PADDED)
PEERS = (TRL, FLATTENING)
"""What the targets compare kubetune with; the padded Trainer is a side row."""


@dataclasses.dataclass
class SideResult:
    """One side's figures for one round."""

    name: str
    seconds: float
    cpu_seconds: float
    """CPU time of the side's process (all threads) in the loop."""
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


@dataclasses.dataclass
class Workload:
    """What every side's process reads from the work folder (written once by the parent)."""

    model: str
    train_file: str
    config: dict[str, Any]
    """kubetune's trainer config."""
    sequences: list[list[int]]
    """The token ids of every training example, exactly as kubetune trains on them."""
    validation: list[dict[str, Any]]
    """Held-out packed sequences (`data.PackedSequence` fields)."""
    kubetune_batch: int
    """Packed sequences per kubetune (and TRL) micro-batch."""
    example_batch: int
    """Examples per batch for the two HF Trainer sides: about kubetune's non-padding tokens per step."""
    max_seq_length: int
    precision: str


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
        # No periodic checkpoints in the timed loop (the other sides save none either).
        "training": {"precision": precision, "packing": True, "checkpointInterval": 1_000_000},
        "job": {"name": "bench-throughput"},
        "output": {"dir": str(output)},
    }


def prepare_kubetune(config_dict: dict[str, Any]) -> Any:
    """The trainer's own setup: data, tokenizer, model, packing, optimizer (not timed)."""
    from kubetune.api import config as cfg
    from kubetune.trainer.__main__ import load_data
    from kubetune.trainer.training import train

    config = cfg.config_from_dict(config_dict)
    tokenizer, prepared = load_data(config)
    return train.setup(config, prepared, tokenizer)


def packed_positions(run: Any) -> tuple[int, int]:
    """(real tokens, computed positions) of the epoch's micro-batches, as `evaluate.collate` pads them."""
    from kubetune.trainer.training import train

    sequences = train.epoch_sequences(run, 0)
    real = computed = 0
    for step in train._plan_for(run, 0)[: run.epoch_steps[0]]:
        for micro in step:
            lengths = [len(sequences[i].input_ids) for i in micro]
            real += sum(lengths)
            computed += max(lengths) * len(lengths)
    return real, computed


def trained_examples(run: Any) -> list[list[int]]:
    """The examples inside kubetune's packed sequences (cut where position ids restart), in packing order."""
    from kubetune.trainer.training import train

    examples = []
    for sequence in train.epoch_sequences(run, 0):
        starts = [i for i, p in enumerate(sequence.position_ids) if p == 0] + [len(sequence.position_ids)]
        examples += [sequence.input_ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return examples


# --- The sides (each runs in its own process) --------------------------------------------------


def run_kubetune(work: Workload) -> SideResult:
    from kubetune.trainer.reporting import Reporter
    from kubetune.trainer.training import train

    run = prepare_kubetune(work.config)
    real, computed = packed_positions(run)
    reporter = Reporter(run.config.job, stream=io.StringIO())
    started, cpu_started = time.perf_counter(), time.process_time()
    state = train.fit(run, reporter)
    _sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert state.tokens_seen == real, (state.tokens_seen, real)
    model = run.accelerator.unwrap_model(run.model)
    return SideResult(KUBETUNE, seconds, cpu_seconds, real, computed, state.step, validation_loss(model, work))


class CountingCollator:
    """Wraps a Trainer's collator to count real tokens and computed positions."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.real = 0
        self.computed = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        ids = batch["input_ids"]
        if "attention_mask" in batch:  # padded rows
            self.real += int(batch["attention_mask"].sum())
        else:  # padding-free: one row, only real tokens (plus a pad_to_multiple_of tail if configured)
            self.real += int(sum(len(f["input_ids"]) for f in features))
        self.computed += int(ids.numel())
        return batch


def _training_arguments(cls: Any, work: Workload, scratch: Path, batch_size: int, **extra: Any) -> Any:
    return cls(
        output_dir=str(scratch / "hf"), per_device_train_batch_size=batch_size, num_train_epochs=1,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
        max_grad_norm=1.0, optim="adamw_torch_fused" if workload.device_kind() == "cuda" else "adamw_torch",
        seed=SEED, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=workload.device_kind() == "cpu", bf16=work.precision == "bf16", dataloader_num_workers=0,
        disable_tqdm=True, **extra,
    )


def _timed_train(name: str, trainer: Any, work: Workload, counter: CountingCollator) -> SideResult:
    started, cpu_started = time.perf_counter(), time.process_time()
    output = trainer.train()
    _sync()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return SideResult(name, seconds, cpu_seconds, counter.real, counter.computed, int(output.global_step),
                      validation_loss(trainer.model, work))


def _hf_model(work: Workload) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work.model)
    model = AutoModelForCausalLM.from_pretrained(work.model, dtype=torch.float32)
    return model, tokenizer


def run_trl(work: Workload, scratch: Path) -> SideResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _hf_model(work)
    # TRL turns activation checkpointing on by default; kubetune and the HF Trainer sides do not: off here too,
    # so every side does the same arithmetic (on the H200, TRL with its default ran at 0.42x the flattening side).
    args = _training_arguments(SFTConfig, work, scratch, work.kubetune_batch, max_length=work.max_seq_length,
                               packing=True, packing_strategy="bfd", dataset_num_proc=None, gradient_checkpointing=False)
    dataset = Dataset.from_list([{"input_ids": ids} for ids in work.sequences])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return _timed_train(TRL, trainer, work, counter)


def run_hf(work: Workload, scratch: Path, *, flatten: bool) -> SideResult:
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer, TrainingArguments

    model, tokenizer = _hf_model(work)
    inner = DataCollatorWithFlattening() if flatten else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    counter = CountingCollator(inner)
    args = _training_arguments(TrainingArguments, work, scratch, work.example_batch)
    dataset = [{"input_ids": ids} for ids in work.sequences]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counter)
    return _timed_train(FLATTENING if flatten else PADDED, trainer, work, counter)


def validation_loss(model: Any, work: Workload) -> float:
    from kubetune.trainer.evaluation import evaluate
    from kubetune.trainer.prep import data

    device = next(model.parameters()).device
    sequences = [data.PackedSequence(**s) for s in work.validation]
    metrics = evaluate.language_model_metrics(model, sequences, batch_size=8, pad_id=0, device=device)
    return float(metrics["loss"])


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_side(name: str, workdir: Path) -> SideResult:
    work = Workload(**json.loads((workdir / "workload.json").read_text()))
    with tempfile.TemporaryDirectory(prefix="side-", dir=workdir) as scratch:
        if name == KUBETUNE:
            return run_kubetune(work)
        if name == TRL:
            return run_trl(work, Path(scratch))
        return run_hf(work, Path(scratch), flatten=name == FLATTENING)


# --- The parent: workload, rounds, figures -------------------------------------------------------


def write_workload(workdir: Path, *, shape: workload.ModelShape, count: int, max_seq_length: int,
                   batch_size: int) -> Workload:
    from kubetune.trainer.prep import data

    precision = "bf16" if workload.device_kind() == "cuda" else "fp32"
    model = workload.create_bench_model(workdir / "model", shape)
    train_file = workload.write_jsonl(workdir / "train.jsonl", workload.instruction_like_texts(count, seed=1))
    config = kubetune_config(model, train_file, workdir / "out", max_seq_length=max_seq_length,
                             batch_size=batch_size, precision=precision)
    probe = prepare_kubetune(config)
    from kubetune.trainer.training import train

    real, _ = packed_positions(probe)
    micro_batches = sum(len(step) for step in train._plan_for(probe, 0)[: probe.epoch_steps[0]])
    sequences = trained_examples(probe)
    mean_length = real / len(sequences)
    validation_texts = workload.instruction_like_texts(max(40, count // 10), seed=2)
    tokens = data.tokenize_examples([data.Example(completion=t) for t in validation_texts], probe.tokenizer)
    validation, _ = data.pack(tokens, max_seq_length, packing=True, chunk_long=True)
    work = Workload(
        model=str(model), train_file=str(train_file), config=config, sequences=sequences,
        validation=[dataclasses.asdict(s) for s in validation], kubetune_batch=batch_size,
        example_batch=max(1, round(real / micro_batches / mean_length)), max_seq_length=max_seq_length,
        precision=precision,
    )
    (workdir / "workload.json").write_text(json.dumps(dataclasses.asdict(work)))
    lengths = sorted(len(s) for s in sequences)
    print(f"model             {shape.describe()}, {probe.num_parameters / 1e6:.1f}M parameters, {precision}")
    print(f"data              {len(sequences)} examples, {real} tokens; length median {lengths[len(lengths) // 2]},"
          f" mean {mean_length:.0f}, p95 {lengths[int(len(lengths) * 0.95)]}, max {lengths[-1]}")
    print(f"batches           kubetune and TRL {batch_size} packed x {max_seq_length} tokens"
          f" (~{real / micro_batches:.0f} real tokens); HF Trainer sides {work.example_batch} examples"
          f" (~{work.example_batch * mean_length:.0f} real tokens); AdamW lr {LEARNING_RATE} constant, 1 epoch")
    return work


def spawn_side(name: str, workdir: Path) -> SideResult:
    """One side in a fresh Python process (nothing warm from another side)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", name, "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SIDE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"side {name!r} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return SideResult(**json.loads(lines[-1].removeprefix("SIDE ")))


def spread(values: list[float], digits: int = 0) -> str:
    """min / median / max."""
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def summary(results: dict[str, list[SideResult]]) -> dict[str, Any]:
    stats = {}
    for name, runs in results.items():
        stats[name] = {
            "tokensPerSecond": [round(r.tokens_per_second, 1) for r in runs],
            "tokensPerCpuSecond": [round(r.tokens_per_cpu_second, 1) for r in runs],
            "medianTokensPerSecond": round(statistics.median(r.tokens_per_second for r in runs), 1),
            "medianTokensPerCpuSecond": round(statistics.median(r.tokens_per_cpu_second for r in runs), 1),
            "paddingFraction": round(runs[-1].padding_fraction, 4),
            "valLoss": [round(r.val_loss, 4) for r in runs],
            "medianValLoss": round(statistics.median(r.val_loss for r in runs), 4),
            "tokens": runs[-1].real_tokens, "steps": runs[-1].steps,
        }
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data, one round: a smoke test")
    parser.add_argument("--examples", type=int, default=None, help="training examples (default 160; quick 120)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of all sides (default 3; quick 1)")
    parser.add_argument("--shape", choices=sorted(workload.SHAPES), default=None,
                        help="the model (default bench, ~3.5M parameters; quick: quick; gpt2-124m for GPUs)")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="kubetune and TRL micro-batch in packed sequences")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_side(args.side, args.workdir)
        print("SIDE " + json.dumps(dataclasses.asdict(result)), flush=True)
        return 0

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or KUBETUNE not in sides:
        parser.error(f"--sides: unknown {unknown} (allowed: {', '.join(SIDES)}; kubetune is required)")
    count = args.examples or (120 if args.quick else 160)
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"hardware          {workload.hardware_line()}")
    results: dict[str, list[SideResult]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch_name:
        workdir = Path(scratch_name)
        shape = workload.SHAPES[args.shape or ("quick" if args.quick else "bench")]
        write_workload(workdir, shape=shape, count=count, max_seq_length=args.max_seq_length,
                       batch_size=args.batch_size)
        failed: dict[str, str] = {}
        for round_index in range(rounds):
            order = sides if round_index % 2 == 0 else sides[::-1]
            for side in order:
                if side in failed:
                    continue
                try:
                    result = spawn_side(side, workdir)
                except RuntimeError as error:
                    if side == KUBETUNE:
                        raise
                    # A peer that cannot run here (its package missing, say) is reported, not silently
                    # dropped, and does not cost the other sides' figures.
                    print(f"round {round_index + 1} {side:<22} FAILED, left out of later rounds: {error}", flush=True)
                    failed[side] = str(error).splitlines()[0]
                    continue
                results[side].append(result)
                print(f"round {round_index + 1} {side:<22} {result.tokens_per_second:8.0f} tokens/s"
                      f"  {result.tokens_per_cpu_second:6.0f} tokens/CPU-s  {result.seconds:6.1f} s  {result.steps} steps"
                      f"  padding {result.padding_fraction:.1%}  val loss {result.val_loss:.4f}"
                      f"  (load {os.getloadavg()[0]:.1f})", flush=True)

    results = {name: runs for name, runs in results.items() if runs}
    stats = summary(results)
    print(f"{'side':<24}{'tokens/s min/med/max':>26}{'tokens/CPU-s min/med/max':>28}  padding  val loss (median)")
    for name, runs in results.items():
        print(f"{name:<24}{spread([r.tokens_per_second for r in runs]):>26}"
              f"{spread([r.tokens_per_cpu_second for r in runs]):>28}  {runs[-1].padding_fraction:6.1%}"
              f"  {stats[name]['medianValLoss']:.4f}{'  (side row)' if name == PADDED else ''}")
    peers = [p for p in PEERS if p in stats]
    best = max(peers, key=lambda p: stats[p]["medianTokensPerSecond"]) if peers else None
    ratios: dict[str, Any] = {}
    for name in stats:
        if name == KUBETUNE:
            continue
        ratios[name] = {
            "wall": round(stats[KUBETUNE]["medianTokensPerSecond"] / stats[name]["medianTokensPerSecond"], 3),
            "cpu": round(stats[KUBETUNE]["medianTokensPerCpuSecond"] / stats[name]["medianTokensPerCpuSecond"], 3),
            "valLossDelta": round(stats[KUBETUNE]["medianValLoss"] - stats[name]["medianValLoss"], 4),
        }
        print(f"kubetune vs {name:<22} {ratios[name]['wall']:.2f}x non-padding tokens/s (wall), "
              f"{ratios[name]['cpu']:.2f}x per CPU-second, val loss {ratios[name]['valLossDelta']:+.4f}")
    if best is not None:
        target = 1.2 if workload.device_kind() == "cuda" else 1.0
        print(f"best peer         {best}: kubetune {ratios[best]['wall']:.2f}x (target >= {target}x at equal or "
              f"better validation loss)")
    print("RESULT " + json.dumps({
        "bench": "trainer_throughput", "quick": args.quick, "device": workload.device_kind(), "rounds": rounds,
        "hardware": workload.hardware_line(), "sides": stats, "ratios": ratios, "bestPeer": best,
        "failedSides": failed,
    }))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
