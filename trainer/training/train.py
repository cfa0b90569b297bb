"""The training loop: setup -> fit, on accelerate, with exact resume and SIGTERM handling.

Data order is a pure function of (seed, epoch): each epoch's packed sequences
are shuffled with `Random(seed, epoch)` and cut into micro-batches, and
micro-batches into optimizer steps. A checkpoint therefore only needs the
step counters to continue exactly where it stopped: the resumed run skips the
steps already done in the epoch, never repeats a batch, and (with optimizer,
scheduler and RNG states restored) reproduces the uninterrupted run's losses.

Data-parallel runs (`python -m kubetune.trainer.launch`, one process per
device) share that plan: each step holds accumulation × world_size
micro-batches and rank r takes every world_size-th one from r (`rank_share`),
so the ranks see disjoint data and, together, each sequence once per epoch;
gradients are averaged across ranks on the step's last micro-batch. The global
batch is batch × world_size × accumulation, and a run with 2 ranks follows the
same trajectory as 1 rank with twice the accumulation.

With `training.strategy: fsdp` and more than one process the model is sharded instead of replicated
(`sharding`: torch's FSDP2 per transformer block); the plan, the loss scaling and the checkpoints'
contents are the same, so an FSDP run follows the DDP and single-process trajectories too. Evaluations
run on every rank over every sequence (a sharded forward needs all ranks in step), and after training
the full weights are gathered into a plain model for the test evaluation, the samples and the saved model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune.api.config import TrainerConfig
from kubetune.trainer.errors import CheckpointError, Preempted
from kubetune.trainer.evaluation import evaluate
from kubetune.trainer.prep import data
from kubetune.trainer.reporting import Reporter
from kubetune.trainer.training import hyperparameters, loss, modeling, sharding
from kubetune.trainer.training.hyperparameters import ResolvedHyperparameters

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
"""Written last into a checkpoint folder: its presence marks the checkpoint complete."""
PROGRESS_INTERVAL_ENV = "KUBETUNE_PROGRESS_INTERVAL"
"""Seconds between `progress` reports (default 5; 0 reports every step)."""
MAX_GRAD_NORM = 1.0


# --- State -------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Everything about the run's position that a checkpoint must carry besides tensors."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps done within `epoch`."""
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    pending_evaluation: bool = False
    """A validation was due at `step` but SIGTERM cut it short: the resumed run does it first."""
    train_losses: list[list[float]] = dataclasses.field(default_factory=list)
    """[step, loss] for every optimizer step."""
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """{"step", "valLoss", "valPerplexity", "valTokenAccuracy", ...} per validation."""


@dataclasses.dataclass
class Run:
    """What setup() builds and fit() uses."""

    config: TrainerConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    hp: ResolvedHyperparameters
    train_examples: list[data.TokenizedExample]
    validation: list[data.PackedSequence]
    validation_texts: list[tuple[str, str]]
    """(text, label) of validation examples, for valAccuracy."""
    labels: list[str] | None
    epoch_steps: list[int]
    """Optimizer steps in each epoch (the last may be partial for fractional epochs)."""
    statistics: dict[str, Any]
    device_kind: str
    num_parameters: int
    trainable_parameters: int
    state: TrainState = dataclasses.field(default_factory=TrainState)
    resumed_from: str | None = None
    sharded: bool = False
    """The model is sharded across the processes (training.strategy fsdp with more than one process)."""
    control_group: Any = None
    """With more than one process: a gloo group on which the ranks agree, over CPU tensors, when to stop."""
    _packed_cache: dict[float, list[data.PackedSequence]] = dataclasses.field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return sum(self.epoch_steps)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)


# --- Epoch plans ---------------------------------------------------------------------


def epoch_sequences(run: Run, epoch: int) -> list[data.PackedSequence]:
    """The packed training sequences of `epoch` (a growing shortest-first subset under curriculum)."""
    fraction = data.curriculum_fraction(epoch, run.config.dataset.curriculum)
    if fraction not in run._packed_cache:
        examples = run.train_examples
        if fraction < 1.0:
            by_length = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
            examples = [examples[i] for i in by_length[: max(1, math.ceil(fraction * len(examples)))]]
        run._packed_cache[fraction], _ = data.pack(
            examples,
            run.hp.max_seq_length,
            packing=run.config.training.packing,
            chunk_long=run.config.dataset.format == "text",
        )
    return run._packed_cache[fraction]


def epoch_plan(num_sequences: int, *, seed: int, epoch: int, batch_size: int, accumulation: int, world_size: int) -> list[list[list[int]]]:
    """Sequence indices per optimizer step, per micro-batch: [step][micro-batch][sequence].

    Each step holds accumulation * world_size micro-batches (the last step of an
    epoch may hold fewer; a remainder that cannot be shared equally by all
    processes is dropped).
    """
    order = list(range(num_sequences))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    micro = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    per_step = accumulation * world_size
    steps = []
    for start in range(0, len(micro), per_step):
        chunk = micro[start : start + per_step]
        usable = len(chunk) - len(chunk) % world_size
        if usable:
            steps.append(chunk[:usable])
    return steps


def rank_share(step_micro_batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """The micro-batches of one optimizer step that rank `rank` trains on: every world_size-th one."""
    return step_micro_batches[rank::world_size]


def _plan_for(run: Run, epoch: int) -> list[list[list[int]]]:
    return epoch_plan(
        len(epoch_sequences(run, epoch)),
        seed=run.hp.seed,
        epoch=epoch,
        batch_size=run.hp.batch_size,
        accumulation=run.hp.gradient_accumulation_steps,
        world_size=run.world_size,
    )


def _epoch_step_counts(run: Run) -> list[int]:
    whole, fraction = divmod(run.hp.epochs, 1)
    counts = [len(_plan_for(run, e)) for e in range(int(whole))]
    if fraction > 1e-9:
        counts.append(max(1, round(fraction * len(_plan_for(run, int(whole))))))
    return counts


# --- Setup -----------------------------------------------------------------------------


def _precision(requested: str, device_kind: str) -> str:
    """accelerate's mixed_precision value for the configured precision."""
    if requested == "fp32" or (requested == "auto" and device_kind != "cuda"):
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def _optimizer(model: Any, learning_rate: float, weight_decay: float, device_kind: str = "cpu") -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters); the fused kernel on CUDA
    (one launch for all parameters instead of several per tensor)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, fused=device_kind == "cuda")


def _scheduler(optimizer: torch.optim.Optimizer, hp: ResolvedHyperparameters, total_steps: int) -> Any:
    from transformers import get_scheduler

    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constantWithWarmup": "constant_with_warmup"}
    warmup = math.ceil(hp.warmup_ratio * total_steps) if hp.scheduler != "constant" else 0
    return get_scheduler(names[hp.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=max(1, total_steps))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_base_model(config: TrainerConfig, precision: str, device_kind: str) -> Any:
    # Frozen LoRA base weights need no fp32 master copy: load them in bf16 (half the memory);
    # peft keeps the adapters themselves in fp32. Full fine-tuning keeps fp32 master weights.
    base_dtype = torch.bfloat16 if config.method.type == "lora" and precision == "bf16" else torch.float32
    return modeling.load_model(
        config.model, dtype=base_dtype, attn_implementation=modeling.select_attention_implementation(device_kind)
    )


def gather_model(run: Run) -> None:
    """Under FSDP, replace the sharded model with a plain one holding the full trained weights on every rank
    (a collective), for what follows training: the test evaluation, the samples and `save_pretrained`.
    The plain model is built as setup built it (base model, dropout, LoRA) and takes the gathered state."""
    if not run.sharded:
        return
    full = sharding.full_model_state(run.model)
    precision = _precision(run.config.training.precision, run.device_kind)
    model = _load_base_model(run.config, precision, run.device_kind)
    if run.hp.dropout is not None:
        modeling.override_dropout(model, run.hp.dropout)
    if run.config.method.type == "lora":
        model = modeling.apply_lora(model, run.config.method.lora_settings())
    model.load_state_dict(full)
    del full
    run.model = model.to(run.accelerator.device)
    run.sharded = False


def setup(config: TrainerConfig, prepared: data.PreparedData, tokenizer: Any) -> Run:
    """Load the model, tokenise and pack the data, resolve `auto` hyperparameters, build optimizer and schedule."""
    from accelerate import Accelerator

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    precision = _precision(config.training.precision, device_kind)
    accelerator = Accelerator(mixed_precision=precision)
    sharded = config.training.strategy == "fsdp" and accelerator.num_processes > 1
    seed = hyperparameters.resolve_seed(config.hyperparameters)
    seed_everything(seed)

    model = _load_base_model(config, precision, device_kind)
    num_parameters = sum(p.numel() for p in model.parameters())
    train_tokens = data.tokenize_examples(prepared.splits.train, tokenizer)
    longest = max((len(t.input_ids) for t in train_tokens), default=1)
    max_len = hyperparameters.resolve_max_seq_length(
        config.hyperparameters, longest, modeling.context_length(model.config, tokenizer)
    )
    chunk = config.dataset.format == "text"
    train_sequences, train_packing = data.pack(train_tokens, max_len, packing=config.training.packing, chunk_long=chunk)
    hp = hyperparameters.resolve(
        config.hyperparameters,
        method=config.method.type,
        num_parameters=num_parameters,
        num_train_examples=len(prepared.splits.train),
        num_train_sequences=len(train_sequences),
        max_seq_length=max_len,
        device="cuda" if device_kind == "cuda" else "cpu",
        world_size=accelerator.num_processes,
    )
    validation, validation_packing = data.pack(
        data.tokenize_examples(prepared.splits.validation, tokenizer), max_len, packing=config.training.packing, chunk_long=chunk
    )

    if hp.dropout is not None:
        modeling.override_dropout(model, hp.dropout)
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method.type == "lora":
            model.enable_input_require_grads()
    if config.method.type == "lora":
        model = modeling.apply_lora(model, config.method.lora_settings())
    _, trainable = modeling.count_parameters(model)
    model.train()

    if config.training.compile:
        log.info("training.compile: compiled %d transformer blocks", modeling.compile_blocks(model))
    loss.compile_chunks(config.training.compile)  # the fused loss's per-chunk softmax and gradient
    if sharded:
        # Shard before the optimizer exists: AdamW's state is then built on (and as large as) the shards.
        blocks = sharding.shard_model(model, device=accelerator.device, world_size=accelerator.num_processes,
                                      precision=precision)
        log.info("training.strategy fsdp: %d blocks sharded across %d processes", blocks, accelerator.num_processes)
        optimizer = accelerator.prepare(_optimizer(model, hp.learning_rate, hp.weight_decay, device_kind))
    else:
        optimizer = _optimizer(model, hp.learning_rate, hp.weight_decay, device_kind)
        model, optimizer = accelerator.prepare(model, optimizer)
    statistics = dict(prepared.statistics())
    statistics["packing"] = {"train": train_packing.to_report(), "validation": validation_packing.to_report()}
    run = Run(
        config=config,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=None,
        hp=hp,
        train_examples=train_tokens,
        validation=validation,
        validation_texts=[(e.prompt, e.label) for e in prepared.splits.validation if e.label is not None],
        labels=prepared.labels,
        epoch_steps=[],
        statistics=statistics,
        device_kind=device_kind,
        num_parameters=num_parameters,
        trainable_parameters=trainable,
        sharded=sharded,
        # CPU tensors over gloo whatever the training backend: agreeing costs no wait for the GPU.
        control_group=torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None,
    )
    run._packed_cache[1.0] = train_sequences
    run.epoch_steps = _epoch_step_counts(run)
    run.scheduler = _scheduler(optimizer, hp, run.total_steps)
    return run


# --- Checkpoints ---------------------------------------------------------------------------


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values only, so `torch.load(weights_only=True)` reads it
    (numpy's own state tuple holds an ndarray, which only a full unpickler could rebuild)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "hasGauss": int(has_gauss), "cachedGaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["hasGauss"], numpy_state["cachedGaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_tensors_and_values(path: Path) -> Any:
    """A torch.save file, unpickled with torch's weights-only loader: tensors, numbers, strings, lists,
    tuples and dicts come back; anything else (a class, a function, `__reduce__` code) is refused, not
    run. Checkpoints live on a claim other pods may write, so resuming must never execute its contents."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint file {path} was refused: it holds objects other than tensors and plain values "
            f"(written by an older trainer, or tampered with); delete {path.parent} to train from the "
            f"previous checkpoint ({str(error).splitlines()[0][:200]})") from None


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run: Run) -> Path:
    """Write a complete checkpoint to a temporary folder and rename it into place."""
    from safetensors.torch import save_file

    directory = run.config.output.checkpoint_path
    final = directory / f"step-{run.state.step}"
    unwrapped = run.accelerator.unwrap_model(run.model)
    if run.sharded:
        # Gathering is a collective: every rank takes part, rank 0 writes the full tensors.
        trainable = sharding.full_trainable_state(unwrapped)
        optimizer_state = sharding.full_optimizer_state(run.model, run.optimizer.optimizer)
    if run.accelerator.is_main_process:
        temporary = directory / f".tmp-step-{run.state.step}-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        if not run.sharded:
            trainable, optimizer_state = _trainable_state(unwrapped), run.optimizer.state_dict()
        save_file(trainable, str(temporary / "trainable.safetensors"))
        torch.save(optimizer_state, temporary / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), temporary / "scheduler.pt")
        torch.save(_rng_state(), temporary / "rng.pt")
        state = dataclasses.asdict(run.state) | {"hyperparameters": run.hp.to_report(), "totalSteps": run.total_steps}
        (temporary / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        _prune_checkpoints(run)
    run.accelerator.wait_for_everyone()
    return final


def _prune_checkpoints(run: Run) -> None:
    keep = run.config.training.keep_checkpoints
    checkpoints = list_checkpoints(run.config.output.checkpoint_path)
    best = run.state.best_checkpoint if run.config.training.keep_best else None
    for _, path in checkpoints[:-keep]:
        if best is None or path.name != Path(best).name:
            shutil.rmtree(path, ignore_errors=True)


def load_trainable_weights(run: Run, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "trainable.safetensors"))
    if run.sharded:
        sharding.reshard(run.model)
    parameters = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            if run.sharded:
                sharding.load_full_tensor(parameters[name], tensor)
            else:
                parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))


def resume(run: Run) -> bool:
    """Continue from the latest complete checkpoint, if any: weights, optimizer, schedule, RNG, position."""
    checkpoints = list_checkpoints(run.config.output.checkpoint_path)
    if not checkpoints:
        return False
    _, latest = checkpoints[-1]
    saved = json.loads((latest / STATE_FILE).read_text())
    recorded = hyperparameters.ResolvedHyperparameters.from_report(saved.pop("hyperparameters"))
    saved.pop("totalSteps", None)
    if recorded.world_size != run.hp.world_size:
        # The data plan depends on the world size, so the position is exact only in the same world; the
        # steps already done stay done, the rest of the epoch is re-planned for the devices there are now.
        log.warning("checkpoint %s was written by %d processes, this run has %d", latest, recorded.world_size,
                    run.hp.world_size)
        recorded = dataclasses.replace(recorded, world_size=run.hp.world_size)
    if recorded != run.hp:
        # The same config and data resolve to the same values; keep the run consistent regardless.
        log.warning("resolved hyperparameters differ from the checkpoint's; using the checkpoint's")
        run.hp = recorded
        run._packed_cache.clear()
        run.epoch_steps = _epoch_step_counts(run)
        run.scheduler = _scheduler(run.optimizer, run.hp, run.total_steps)
    optimizer_state = _load_tensors_and_values(latest / "optimizer.pt")
    scheduler_state = _load_tensors_and_values(latest / "scheduler.pt")
    rng_state = _load_tensors_and_values(latest / "rng.pt")
    try:
        load_trainable_weights(run, latest)
        if run.sharded:
            sharding.load_full_optimizer_state(run.model, run.optimizer.optimizer, optimizer_state)
        else:
            run.optimizer.load_state_dict(optimizer_state)
        run.scheduler.load_state_dict(scheduler_state)
        _set_rng_state(rng_state)
        run.state = TrainState(**saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {latest} does not fit this run: {error}") from error
    run.resumed_from = str(latest)
    return True


# --- Fit --------------------------------------------------------------------------------------


class _TermSignal:
    """Records SIGTERM so the loop can stop at the next step boundary and checkpoint."""

    def __init__(self) -> None:
        self.received = False
        """Set by the handler, in this process."""
        self.agreed = False
        """Set by `_agreed_stop`: every rank stops (the loop reads only this)."""
        self._previous: Any = None

    def __enter__(self) -> _TermSignal:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: checkpointing at the end of this step")
        self.received = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _agreed_stop(run: Run, term: _TermSignal) -> bool:
    """Whether to stop for SIGTERM, decided by every rank at once; also kept in `term.agreed`.

    Each process gets the signal at its own moment. A rank that went on into the next step while
    another checkpoints would wait forever in its collectives (FSDP's all-gathers, DDP's all-reduce):
    so the ranks agree, all at the same points of the loop, and the loop acts on `term.agreed` only.
    A signal that lands after an agreement waits for the next one (`term.received` stays set).
    """
    if run.control_group is None:
        term.agreed = term.agreed or term.received
        return term.agreed
    flag = torch.tensor([int(term.received)], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=run.control_group)
    term.agreed = term.agreed or bool(flag.item())
    return term.agreed


MAXIMIZED_METRICS = ("valAccuracy", "valF1")
"""Early-stopping metrics where higher is better; losses and perplexities are minimised."""


def _is_better(value: float, best: float | None, metric: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if metric in MAXIMIZED_METRICS else value < best - min_delta


def validate(run: Run, should_stop: Callable[[], bool] = lambda: False) -> dict[str, float]:
    """valLoss, valPerplexity, valTokenAccuracy; for classification also valAccuracy and macro valF1
    (at every evaluation: a sweep may rank or prune trials by them)."""
    if run.sharded:
        # A sharded forward all-gathers each block: every rank must run the same batches, to the end.
        sequences, reduce, should_stop = run.validation, _identity, _never
    else:
        sequences, reduce = run.validation[run.accelerator.process_index :: run.world_size], run.accelerator.reduce
    metrics = evaluate.language_model_metrics(
        run.model,
        sequences,
        batch_size=run.hp.batch_size,
        pad_id=run.pad_id,
        device=run.accelerator.device,
        reduce=reduce,
        should_stop=should_stop,
    )
    result = {f"val{key[0].upper()}{key[1:]}": value for key, value in metrics.items()}
    if run.labels and run.validation_texts and not should_stop():
        texts = [t for t, _ in run.validation_texts]
        predicted = evaluate.predict_labels(
            run.accelerator.unwrap_model(run.model), run.tokenizer, texts, run.labels, run.accelerator.device
        )
        truth = [label for _, label in run.validation_texts]
        scores = evaluate.classification_metrics(truth, predicted, run.labels)
        result["valAccuracy"], result["valF1"] = scores["accuracy"], scores["f1"]
    return result


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _never() -> bool:
    return False


def _micro_batch_loss(run: Run, sequences: list[data.PackedSequence]) -> tuple[torch.Tensor, torch.Tensor, int]:
    batch = evaluate.collate(sequences, run.pad_id, run.accelerator.device, flatten=evaluate.flat_batches(run.model))
    with run.accelerator.autocast():  # the loss head runs outside the model's own (autocast-wrapped) forward
        loss, targets = evaluate.training_loss(run.model, batch)
    tokens = sum(len(s.input_ids) for s in sequences)
    return loss, targets, tokens


def _optimizer_step(run: Run, sequences: list[data.PackedSequence], step_micro_batches: list[list[int]]) -> torch.Tensor:
    """One optimizer step over this process's share of the step's micro-batches; returns the mean loss,
    still on the device (reading it would wait for the GPU: `fit` reads losses only when it reports)."""
    mine = rank_share(step_micro_batches, run.accelerator.process_index, run.world_size)
    # Each micro-batch's loss is its weighted token mean; scaled by its share of the whole step's target
    # weight, the step optimises the weighted token mean over every rank's micro-batches: the same whatever
    # the accumulation and the world size (DDP averages over ranks, hence × world_size).
    step_weight = max(1e-8, sum(target_weight(sequences[i]) for micro in step_micro_batches for i in micro))
    losses = []
    for index, micro in enumerate(mine):
        last = index == len(mine) - 1
        if run.sharded:
            sharding.set_gradient_sync(run.model, last)
            context: Any = _null_context()
        else:
            context = run.accelerator.no_sync(run.model) if not last else _null_context()
        share = sum(target_weight(sequences[i]) for i in micro) / step_weight
        with context:
            loss, _, _ = _micro_batch_loss(run, [sequences[i] for i in micro])
            run.accelerator.backward(loss * (share * run.world_size))
        losses.append(loss.detach() * share)
    # Every rank knows the whole step's plan: count the tokens of all ranks' micro-batches, no all-reduce.
    run.state.tokens_seen += sum(len(sequences[i].input_ids) for micro in step_micro_batches for i in micro)
    if run.sharded:
        run.accelerator.unscale_gradients()
        sharding.clip_grad_norm(run.model, MAX_GRAD_NORM)
    elif run.accelerator.sync_gradients:
        run.accelerator.clip_grad_norm_(run.model.parameters(), MAX_GRAD_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    mine_total = torch.stack(losses).sum()
    return run.accelerator.reduce(mine_total, reduction="sum")  # type: ignore[no-any-return]


def target_weight(sequence: data.PackedSequence) -> float:
    """The loss weight of a sequence's targets (every position after the first whose label counts), as
    `evaluate.training_loss` sums it."""
    return float(sum(w for label, w in zip(sequence.labels[1:], sequence.weights[1:], strict=True)
                     if label != data.IGNORE_INDEX))


class _null_context:  # noqa: N801 - used like contextlib.nullcontext, typed for clarity
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def fit(run: Run, reporter: Reporter) -> TrainState:
    """Train until the planned steps are done, early stopping triggers, or SIGTERM arrives (Preempted)."""
    config = run.config.training
    stopping = config.early_stopping
    state = run.state
    interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, "5"))
    started = time.monotonic()
    tokens_at_start = state.tokens_seen
    last_progress = 0.0
    pending_losses: list[tuple[int, torch.Tensor]] = []
    """(step, loss on the device) not yet read: one host sync per report instead of one per step."""

    def flush_losses() -> None:
        if pending_losses:
            values = torch.stack([loss for _, loss in pending_losses]).tolist()
            state.train_losses.extend([step, value] for (step, _), value in zip(pending_losses, values, strict=True))
            pending_losses.clear()

    def report_progress(kind: str, **extra: Any) -> None:
        flush_losses()
        elapsed = max(1e-9, time.monotonic() - started)
        steps_done = max(1, state.step - steps_at_start)
        reporter.report(
            kind,
            step=state.step,
            totalSteps=run.total_steps,
            epoch=_epoch_float(run, state),
            trainLoss=state.train_losses[-1][1] if state.train_losses else None,
            learningRate=run.scheduler.get_last_lr()[0],
            tokensSeen=state.tokens_seen,
            tokensPerSecond=round((state.tokens_seen - tokens_at_start) / elapsed, 1),
            etaSeconds=round(elapsed / steps_done * (run.total_steps - state.step), 1),
            **extra,
        )

    steps_at_start = state.step
    with _TermSignal() as term:

        def checkpoint(val_loss: float | None = None) -> Path:
            flush_losses()  # the checkpoint's state carries every step's loss
            path = save_checkpoint(run)
            report_progress("checkpoint", checkpoint={"step": state.step, "path": str(path), "valLoss": val_loss})
            return path

        def run_validation() -> bool:
            """Validate, track the best, checkpoint; True when early stopping says stop."""
            state.pending_evaluation = True
            metrics = validate(run, should_stop=lambda: term.received)
            if _agreed_stop(run, term) or not metrics:
                return False
            state.pending_evaluation = False
            state.evaluations.append({"step": state.step, **metrics})
            report_progress("evaluation", valLoss=metrics.get("valLoss"), valPerplexity=metrics.get("valPerplexity"),
                            results={k: v for k, v in metrics.items() if k not in ("valLoss", "valPerplexity")})
            value = metrics.get(stopping.metric)
            improved = value is not None and _is_better(value, state.best_metric, stopping.metric, stopping.min_delta)
            if improved:
                state.best_metric, state.best_step = value, state.step
                state.evaluations_without_improvement = 0
            else:
                state.evaluations_without_improvement += 1
            periodic = config.checkpoint_interval == 0
            if improved and config.keep_best:
                state.best_checkpoint = str(run.config.output.checkpoint_path / f"step-{state.step}")
            if periodic or (improved and config.keep_best):
                checkpoint(metrics.get("valLoss"))
            return stopping.enabled and state.evaluations_without_improvement >= stopping.patience

        if state.step == 0:
            initial = validate(run)
            if initial:
                state.evaluations.append({"step": 0, **initial})
        if state.pending_evaluation and run_validation():
            state.stopped_early = True
        while state.epoch < len(run.epoch_steps) and not state.stopped_early:
            sequences = epoch_sequences(run, state.epoch)
            plan = _plan_for(run, state.epoch)[: run.epoch_steps[state.epoch]]
            for step_micro_batches in plan[state.step_in_epoch :]:
                step_loss = _optimizer_step(run, sequences, step_micro_batches)
                state.step += 1
                state.step_in_epoch += 1
                pending_losses.append((state.step, step_loss))
                _agreed_stop(run, term)  # every rank stops after the same step
                if state.step_in_epoch == len(plan):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if time.monotonic() - last_progress >= interval or state.step == 1:
                    report_progress("progress")
                    last_progress = time.monotonic()
                evaluate_now = config.eval_interval > 0 and state.step % config.eval_interval == 0
                evaluate_now = evaluate_now or (config.eval_interval == 0 and state.step_in_epoch == 0)
                if term.agreed:
                    state.pending_evaluation = evaluate_now and bool(run.validation)
                elif evaluate_now and run.validation and run_validation():
                    state.stopped_early = True
                    break
                if term.agreed:  # agreed before this step's validation, or within it
                    checkpoint()
                    raise Preempted(f"SIGTERM at step {state.step}: checkpoint saved",
                                    tokens_processed=state.tokens_seen - tokens_at_start)
                if config.checkpoint_interval and state.step % config.checkpoint_interval == 0:
                    checkpoint()
                elif not config.checkpoint_interval and not run.validation and state.step_in_epoch == 0:
                    checkpoint()  # no validations to checkpoint at: keep one per epoch
                if state.step_in_epoch == 0:
                    break  # epoch finished: plan the next one
        if run.validation and (not state.evaluations or state.evaluations[-1]["step"] != state.step):
            run_validation()
    flush_losses()
    return state


def _epoch_float(run: Run, state: TrainState) -> float:
    if state.epoch >= len(run.epoch_steps):
        return round(float(run.hp.epochs), 4)
    return round(state.epoch + state.step_in_epoch / max(1, run.epoch_steps[state.epoch]), 4)


def restore_best(run: Run) -> int:
    """Load the best checkpoint's weights when it is not the last step; returns the step the model is from."""
    state = run.state
    if not (run.config.training.keep_best and state.best_checkpoint and state.best_step is not None):
        return state.step
    if state.best_step == state.step or not Path(state.best_checkpoint).is_dir():
        return state.step
    load_trainable_weights(run, Path(state.best_checkpoint))
    return state.best_step
