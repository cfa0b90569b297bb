"""GPU efficiency of kubetune's own trainer: GPT-2-124M MFU against a tuned reference loop, LoRA on a ~1B model against TRL.

(a) MFU. A randomly initialised GPT-2-124M (12 layers, 768 wide, 12 heads,
    vocabulary 50257, 1024 positions) trained in bf16 on packed 1024-token
    sequences by kubetune's trainer (`train.setup` + `train.fit`, the code path
    of `python -m kubetune.trainer`, `training.compile: true`), and by a tuned
    reference loop in plain PyTorch (whole-model `torch.compile`, SDPA, bf16
    autocast, fused AdamW, full rows of random tokens: the nanoGPT recipe).
    MFU = achieved FLOP/s / the GPU's dense bf16 peak, with the PaLM paper's
    FLOPs per token: 6 N + 12 L d T (N parameters without position
    embeddings, L layers, d width, T sequence length). kubetune is credited
    only with its non-padding tokens. The peak comes from an exact table of
    GPU names: an unknown GPU is an error (pass `--peak-tflops`), never a guess.
(b) LoRA. A Llama-3.2-1B-shaped model (16 layers, 2048 wide, 8192 MLP, 32
    heads / 8 KV heads, vocabulary 128256, ~1.2B parameters) in bf16, LoRA
    r=16 on q/k/v/o, packed 2048-token sequences: kubetune's trainer against
    TRL's SFTTrainer (peft, `packing=True`, best-fit decreasing), tokens/s and
    peak GPU memory.

Each side runs in its own process; each times 3 windows of steps after a
warm-up (compilation included in the warm-up) and prints min/median/max.
`--plan-only` runs every part on the CPU with tiny shapes and a few steps (the
whole data path, the FLOP and MFU arithmetic with the table's H100 entry):
a check that the suite will run, not a measurement.

    python bench/gpu_mfu.py                 # on a GPU: ~4 minutes (compilation dominates)
    python bench/gpu_mfu.py --plan-only     # CPU, tiny shapes (a unit test runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import workload

PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.1,
    "NVIDIA L4": 121.0,
    "NVIDIA B200": 2250.0,
}
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by the exact name
`torch.cuda.get_device_name()` returns. Exact names only: "H100" alone covers parts from 756 to 989."""
PLAN_GPU = "NVIDIA H100 80GB HBM3"
"""The entry `--plan-only` computes MFU against (the arithmetic is checked; the figure means nothing)."""

WINDOWS = 3
"""Timed windows per side (min/median/max over them)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and step counts of one run of the suite."""

    gpt2: dict[str, int]
    gpt2_batch: int
    llama: dict[str, Any]
    lora_batch: int
    lora_sequence: int
    warmup: int
    window: int
    precision: str


GPU_PLAN = Plan(
    gpt2={"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    gpt2_batch=16,
    llama={"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 2048,
           "tie_word_embeddings": True},
    lora_batch=4,
    lora_sequence=2048,
    warmup=8,
    window=10,
    precision="bf16",
)
CPU_PLAN = Plan(
    gpt2={"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1024, "n_positions": 128},
    gpt2_batch=2,
    llama={"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128,
           "tie_word_embeddings": True},
    lora_batch=2,
    lora_sequence=128,
    warmup=1,
    window=1,
    precision="fp32",
)


def peak_tflops(device_name: str, override: float | None) -> float:
    """The GPU's dense bf16 peak; an unknown GPU stops the run (a guessed peak makes MFU meaningless)."""
    if override:
        return override
    if device_name not in PEAK_BF16_TFLOPS:
        raise SystemExit(f"gpu_mfu: no dense bf16 peak for {device_name!r}; known GPUs: "
                         f"{', '.join(PEAK_BF16_TFLOPS)}. Pass --peak-tflops with the data sheet's dense bf16 figure.")
    return PEAK_BF16_TFLOPS[device_name]


def flops_per_token(parameters: int, layers: int, width: int, sequence: int) -> int:
    """PaLM (Chowdhery et al. 2022, appendix B): 6 N for the matmuls' forward and backward, 12 L d T for attention."""
    return 6 * parameters + 12 * layers * width * sequence


# --- Model folders and data (built once by the parent, read by every side) -----------------------------------


def model_folder(folder: Path, arch: str, shape: dict[str, Any], device: str) -> Path:
    """The tiny model's tokenizer with a randomly initialised model of `shape` (bf16 on disk for Llama)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from kubetune.dev import tinymodel

    tinymodel.create_tiny_model(folder, arch="gpt2" if arch == "gpt2" else "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    with torch.device(device):
        if arch == "gpt2":
            model: Any = GPT2LMHeadModel(GPT2Config(**shape, **ids))
        else:
            model = LlamaForCausalLM(LlamaConfig(**shape, **ids)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def texts_for(tokens: int) -> list[str]:
    """Instruction-like texts with at least `tokens` tokens in all (~42 tokens each with the tiny tokenizer)."""
    return workload.instruction_like_texts(max(64, tokens // 30), seed=3)


# --- Timing ---------------------------------------------------------------------------------------------------


class WindowClock:
    """Times `WINDOWS` windows of `window` steps after `warmup` steps, syncing the GPU only at window edges.

    With `profile_to`, the last window runs under torch.profiler (its time is then marked as profiled)
    and the kernels and operators taking the most time are written there as a table."""

    def __init__(self, warmup: int, window: int, profile_to: Path | None = None) -> None:
        self.warmup, self.window = warmup, window
        self.steps = 0
        self.tokens = 0
        self.windows: list[tuple[int, float]] = []
        """(tokens, seconds) per window."""
        self._mark: float | None = None
        self._profile_to = profile_to
        self._profiler: Any = None

    @property
    def total_steps(self) -> int:
        return self.warmup + WINDOWS * self.window

    def step_done(self, tokens: int) -> None:
        self.steps += 1
        if self.steps <= self.warmup:
            if self.steps == self.warmup:
                self._mark = _synced_now()
            return
        self.tokens += tokens
        if (self.steps - self.warmup) % self.window == 0:
            now = _synced_now()
            assert self._mark is not None
            self.windows.append((self.tokens, now - self._mark))
            self.tokens, self._mark = 0, now
            if self._profile_to and len(self.windows) == WINDOWS - 1:
                self._start_profiler()
            elif self._profiler is not None and len(self.windows) == WINDOWS:
                self._write_profile()
            self._mark = _synced_now()

    def _start_profiler(self) -> None:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.start()

    def _write_profile(self) -> None:
        import torch

        self._profiler.stop()
        averages = self._profiler.key_averages()
        device = "device" if torch.cuda.is_available() else "cpu"
        tables = [f"Top operators by self {device} time over the last window ({self.window} steps):",
                  averages.table(sort_by=f"self_{device}_time_total", row_limit=25, max_name_column_width=60),
                  "Top operators by CPU time (host side: Python, launches, syncs):",
                  averages.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)]
        assert self._profile_to is not None
        self._profile_to.write_text("\n".join(tables))
        self._profiler = None

    def figures(self) -> dict[str, Any]:
        rates = [tokens / seconds for tokens, seconds in self.windows]
        return {"tokensPerSecond": [round(r, 1) for r in rates], "medianTokensPerSecond": round(statistics.median(rates), 1),
                "windows": len(rates), "stepsPerWindow": self.window, "warmupSteps": self.warmup,
                "lastWindowProfiled": self._profile_to is not None}


def _synced_now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(workload.peak_rss_mib() / 1024, 2)


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# --- Sides ----------------------------------------------------------------------------------------------------


def _profile_path(work: dict[str, Any], part: str, side: str) -> Path | None:
    """Where a side writes its profile table, when the run profiles (`--profile`)."""
    if not work.get("profile"):
        return None
    return Path(work["scratch"]) / f"profile-{part}-{side.replace('=', '-')}.txt"


def kubetune_side(work: dict[str, Any], part: str, variant: str | None = None) -> dict[str, Any]:
    """kubetune's trainer, timed from outside: `train._optimizer_step` is wrapped, the trainer is unchanged.

    `variant` measures one change beside the plan's own settings, printed under its own name:
    "attention=NAME" replaces the kernel the trainer would select, "compile=off" turns
    `training.compile` off (the field's default). Two diagnostics (not training as the trainer does; the
    time they save says what a part costs): "mask=causal" gives every row plain 0..T-1 positions, so
    attention sees one causal sequence per row (SDPA's flash kernel, no packed block mask), and
    "loss=logits" turns the fused loss off (the model's own head, full logits)."""
    attention = variant.removeprefix("attention=") if variant and variant.startswith("attention=") else None
    import torch

    from kubetune.api import config as cfg
    from kubetune.trainer.__main__ import load_data
    from kubetune.trainer.evaluation import evaluate
    from kubetune.trainer.reporting import Reporter
    from kubetune.trainer.training import loss, modeling, train

    if attention:
        modeling.select_attention_implementation = lambda device_kind: attention
    if variant == "loss=logits":
        loss.fused_head = lambda model: None
    if variant == "mask=causal":
        collate = evaluate.collate

        def causal_rows(sequences: Any, *args: Any, **kwargs: Any) -> Any:
            batch = collate(sequences, *args, **kwargs)
            rows, width = batch["position_ids"].shape
            batch["position_ids"] = torch.arange(width, device=batch["position_ids"].device).expand(rows, width)
            return batch

        evaluate.collate = causal_rows

    plan = Plan(**work["plan"])
    lora = part == "lora"
    config = cfg.config_from_dict({
        "model": {"source": work["llama" if lora else "gpt2"]},
        "dataset": {"format": "text", "train": {"source": work["train"]}, "split": {"validation": 0, "test": 0}},
        "method": {"type": "lora", "lora": {"rank": 16, "alpha": 32, "dropout": 0.0,
                                            "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
        if lora else {"type": "full"},
        "hyperparameters": {"epochs": 1, "batchSize": plan.lora_batch if lora else plan.gpt2_batch,
                            "gradientAccumulationSteps": 1,
                            "maxSeqLength": plan.lora_sequence if lora else plan.gpt2["n_positions"],
                            "learningRate": 2e-4 if lora else 6e-4, "scheduler": "constant", "warmupRatio": 0,
                            "seed": 1},
        "training": {"precision": plan.precision, "packing": True, "checkpointInterval": 1_000_000,
                     "compile": work["compile"] and not lora and variant != "compile=off"},
        "job": {"name": f"bench-{part}"},
        "output": {"dir": work["scratch"] + f"/kubetune-{part}"},
    })
    tokenizer, prepared = load_data(config)
    run = train.setup(config, prepared, tokenizer)
    clock = WindowClock(plan.warmup, plan.window, _profile_path(work, part, variant or "kubetune"))
    if run.total_steps < clock.total_steps:
        raise SystemExit(f"gpu_mfu: {run.total_steps} steps of data, {clock.total_steps} needed")
    run.epoch_steps = [clock.total_steps]  # the plan's first steps only
    original = train._optimizer_step

    def timed_step(run: Any, sequences: Any, micro_batches: list[list[int]]) -> Any:
        loss = original(run, sequences, micro_batches)
        clock.step_done(sum(len(sequences[i].input_ids) for micro in micro_batches for i in micro))
        return loss

    train._optimizer_step = timed_step
    _reset_peak_memory()
    train.fit(run, Reporter(config.job, stream=io.StringIO()))
    base = modeling.base_model(run.model)
    return {"side": f"kubetune ({variant})" if variant else "kubetune", **clock.figures(),
            "peakMemoryGiB": _peak_memory_gib(),
            "parameters": sum(p.numel() for p in base.parameters()), "trainable": run.trainable_parameters,
            "attention": modeling.attention_implementation_of(run.model), "compiled": config.training.compile}


def reference_side(work: dict[str, Any]) -> dict[str, Any]:
    """The tuned plain-PyTorch loop (nanoGPT's recipe) on full rows of random tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = Plan(**work["plan"])
    device = workload.device_kind()
    model = AutoModelForCausalLM.from_pretrained(work["gpt2"], dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device == "cuda")
    forward = torch.compile(model) if work["compile"] else model
    sequence = plan.gpt2["n_positions"]
    generator = torch.Generator(device="cpu").manual_seed(1)
    clock = WindowClock(plan.warmup, plan.window, _profile_path(work, "mfu", "reference"))
    _reset_peak_memory()
    for _ in range(clock.total_steps):
        ids = torch.randint(0, plan.gpt2["vocab_size"], (plan.gpt2_batch, sequence), generator=generator).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(ids.numel())
    return {"side": "reference", **clock.figures(), "peakMemoryGiB": _peak_memory_gib(),
            "parameters": sum(p.numel() for p in model.parameters()), "compiled": work["compile"]}


def trl_side(work: dict[str, Any]) -> dict[str, Any]:
    """TRL's SFTTrainer with peft LoRA and best-fit-decreasing packing, timed by a callback."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    plan = Plan(**work["plan"])
    device = workload.device_kind()
    tokenizer = AutoTokenizer.from_pretrained(work["llama"])
    model = AutoModelForCausalLM.from_pretrained(work["llama"], dtype=torch.bfloat16)
    clock = WindowClock(plan.warmup, plan.window, _profile_path(work, "lora", "trl"))
    texts = [json.loads(line)["text"] for line in Path(work["train"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"text": t} for t in texts])
    args = SFTConfig(
        output_dir=work["scratch"] + "/trl", per_device_train_batch_size=plan.lora_batch, max_steps=clock.total_steps,
        learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=1,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=device == "cpu",
        bf16=plan.precision == "bf16", dataloader_num_workers=0, disable_tqdm=True,
        max_length=plan.lora_sequence, packing=True, packing_strategy="bfd", dataset_num_proc=None,
        # TRL turns activation checkpointing on by default (SFTConfig); kubetune's default is off. Like for
        # like: off here too (the first H200 run, with TRL's default, measured TRL at 14.1k tokens/s).
        gradient_checkpointing=False,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    inner = trainer.data_collator
    pending = [0]

    def counting(features: list[dict[str, Any]]) -> Any:
        pending[0] += sum(len(f["input_ids"]) for f in features)
        return inner(features)

    trainer.data_collator = counting

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.step_done(pending[0])
            pending[0] = 0

    trainer.add_callback(Clock())
    _reset_peak_memory()
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"side": "TRL SFTTrainer", **clock.figures(), "peakMemoryGiB": _peak_memory_gib(),
            "trainable": trainable}


# --- The parent --------------------------------------------------------------------------------------------


def spawn(side: str, part: str, work_file: Path, variant: str | None = None) -> dict[str, Any]:
    """One side in a fresh process; its `SIDE {json}` line, or `{"failed": ...}` with the end of its output
    (one side failing, say a peer's package missing, must not lose the other sides' figures)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--part", part, "--work", str(work_file)]
    proc = subprocess.run(command + (["--variant", variant] if variant else []), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SIDE ")]
    if proc.returncode != 0 or not lines:
        print(f"gpu_mfu: {part}/{side} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}",
              file=sys.stderr, flush=True)
        return {"failed": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}"}
    return dict(json.loads(lines[-1].removeprefix("SIDE ")))


def spread(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in (min(values), statistics.median(values), max(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-only", "--quick", dest="plan_only", action="store_true",
                        help="CPU, tiny shapes, a few steps: checks the whole path, measures nothing")
    parser.add_argument("--parts", default="mfu,lora", help="comma-separated: mfu, lora")
    parser.add_argument("--no-compile", action="store_true", help="neither side compiles (to compare)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for a GPU not in the table")
    parser.add_argument("--candidates", action="store_true",
                        help="on a GPU, also measure kubetune with compile off (the field's default) and, for LoRA, "
                             "with flex attention (a packed kernel without flash_attn)")
    parser.add_argument("--variants", default="",
                        help="comma-separated extra kubetune sides for the GPT-2 part (diagnostics): mask=causal, "
                             "loss=logits, compile=off, attention=NAME")
    parser.add_argument("--profile", action="store_true",
                        help="profile each side's last window (torch.profiler) and print the top operators")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        work = json.loads(args.work.read_text())
        if args.side == "kubetune":
            result = kubetune_side(work, args.part, args.variant)
        elif args.side == "reference":
            result = reference_side(work)
        else:
            result = trl_side(work)
        print("SIDE " + json.dumps(result), flush=True)
        return 0

    device = workload.device_kind()
    if device != "cuda" and not args.plan_only:
        raise SystemExit("gpu_mfu: no GPU here; --plan-only runs the same path on the CPU with tiny shapes")
    plan = CPU_PLAN if args.plan_only else GPU_PLAN
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = peak_tflops(gpu or PLAN_GPU, args.peak_tflops)  # fails before any work on an unknown GPU
    label = "plan only: CPU, tiny shapes (figures mean nothing)" if args.plan_only else f"GPU {gpu}"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    print(f"hardware          {workload.hardware_line()}")
    result: dict[str, Any] = {"bench": "gpu_mfu", "device": device, "planOnly": args.plan_only, "gpu": gpu,
                              "peakTflops": peak}
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-") as scratch:
        root = Path(scratch)
        steps = plan.warmup + WINDOWS * plan.window
        # texts_for() writes ~1.4x this: enough for every step of the larger part, little to tokenise.
        tokens = steps * max(plan.gpt2_batch * plan.gpt2["n_positions"], plan.lora_batch * plan.lora_sequence)
        # Compilation on a CPU takes minutes and says nothing about a GPU: the plan checks the rest of the path
        # (tests/unit/trainer/test_trainer_hot_path.py checks that compiled blocks compute the same numbers).
        compile_sides = not args.no_compile and device == "cuda"
        work: dict[str, Any] = {"plan": dataclasses.asdict(plan), "scratch": scratch, "compile": compile_sides,
                                "profile": args.profile,
                                "train": str(workload.write_jsonl(root / "train.jsonl", texts_for(tokens)))}
        if "mfu" in parts:
            work["gpt2"] = str(model_folder(root / "gpt2", "gpt2", plan.gpt2, device))
        if "lora" in parts:
            work["llama"] = str(model_folder(root / "llama", "llama", plan.llama, device))
        work_file = root / "work.json"
        work_file.write_text(json.dumps(work))

        if "mfu" in parts:
            sides = {s: spawn(s, "mfu", work_file) for s in ("kubetune", "reference")}
            if compile_sides and args.candidates:  # what a user gets from the field's default (off)
                sides["kubetune (compile off)"] = spawn("kubetune", "mfu", work_file, variant="compile=off")
            for variant in filter(None, (v.strip() for v in args.variants.split(","))):
                sides[f"kubetune ({variant})"] = spawn("kubetune", "mfu", work_file, variant=variant)
            shape = plan.gpt2
            for name, side in sides.items():
                if "failed" in side:
                    print(f"GPT-2 MFU  {name:<10} FAILED: {side['failed']}")
                    continue
                parameters = side["parameters"] - shape["n_positions"] * shape["n_embd"]  # without wpe
                per_token = flops_per_token(parameters, shape["n_layer"], shape["n_embd"], shape["n_positions"])
                side["flopsPerToken"] = per_token
                side["mfu"] = [rate * per_token / (peak * 1e12) for rate in side["tokensPerSecond"]]  # unrounded:
                side["medianMfu"] = statistics.median(side["mfu"])  # a plan's tiny shapes give ~1e-8
                print(f"GPT-2 MFU  {name:<10} [{label}] {shape['n_layer']} layers x {shape['n_embd']}, batch "
                      f"{plan.gpt2_batch} x {shape['n_positions']}: tokens/s min/median/max "
                      f"{spread(side['tokensPerSecond'])}, MFU median {side['medianMfu']:.1%} of {peak:.0f} TFLOP/s"
                      f"{' (compiled)' if side['compiled'] else ''}, attention {side.get('attention', 'sdpa')}")
            result["mfu"] = {**sides, "ratio": _ratio(sides["kubetune"], sides["reference"])}
            for name in sides:
                if name not in ("kubetune", "reference"):
                    result["mfu"][f"ratio {name}"] = _ratio(sides[name], sides["reference"])
            print(f"GPT-2 MFU  kubetune / reference {result['mfu']['ratio']}x "
                  f"(targets: kubetune MFU >= 35%, >= 0.9x the reference)")
            _print_profiles(root, "mfu")
            print("PARTIAL RESULT " + json.dumps(result), flush=True)  # kept by gpu_suite.sh if the next part is cut off
        if "lora" in parts:
            sides = {"kubetune": spawn("kubetune", "lora", work_file)}
            if device == "cuda" and args.candidates:
                # transformers builds flex attention's block mask from the packed position ids: the packed
                # kernel a GPU without flash_attn could use instead of SDPA's dense mask (Llama has it, GPT-2 not).
                sides["kubetune (flex_attention)"] = spawn("kubetune", "lora", work_file, variant="attention=flex_attention")
            sides["trl"] = spawn("trl", "lora", work_file)
            for name, side in sides.items():
                if "failed" in side:
                    print(f"LoRA ~1B   {name:<10} FAILED: {side['failed']}")
                    continue
                print(f"LoRA ~1B   {name:<10} [{label}] {plan.llama['num_hidden_layers']} layers x "
                      f"{plan.llama['hidden_size']}, batch {plan.lora_batch} x {plan.lora_sequence}: tokens/s "
                      f"min/median/max {spread(side['tokensPerSecond'])}, peak memory {side['peakMemoryGiB']:.2f} GiB"
                      f"{', attention ' + side['attention'] if 'attention' in side else ''}")
            result["lora"] = {**sides, "ratio": _ratio(sides["kubetune"], sides["trl"])}
            for name in sides:
                if name != "trl" and name != "kubetune":
                    result["lora"][f"ratio {name}"] = _ratio(sides[name], sides["trl"])
            print(f"LoRA ~1B   kubetune / TRL {result['lora']['ratio']}x tokens/s")
            _print_profiles(root, "lora")
    failed = [f"{part}/{name}" for part in ("mfu", "lora") for name, side in result.get(part, {}).items()
              if isinstance(side, dict) and "failed" in side]
    result["failedSides"] = failed
    print("RESULT " + json.dumps(result))
    return 1 if failed else 0


def _print_profiles(root: Path, part: str) -> None:
    for path in sorted(root.glob(f"profile-{part}-*.txt")):
        print(f"--- {path.stem} (the last window of this side ran under the profiler) ---")
        print(path.read_text(), flush=True)


def _ratio(side: dict[str, Any], baseline: dict[str, Any]) -> float | None:
    """median tokens/s of `side` over `baseline`'s; None where either failed."""
    if "failed" in side or "failed" in baseline:
        return None
    return round(side["medianTokensPerSecond"] / baseline["medianTokensPerSecond"], 3)


if __name__ == "__main__":
    sys.exit(main())
