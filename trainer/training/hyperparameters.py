"""Resolving `auto` hyperparameters into concrete values, and recording which were automatic.

Pure functions over a few facts about the run (dataset size, model size,
method, device); no torch. The rules are documented in docs/trainer.md and
mirror what hosted fine-tuning services do: about 3 epochs, more for tiny
datasets and fewer for huge ones; LoRA at 2e-4; full fine-tuning at a learning
rate that shrinks with model size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from kubetune.api.finetunejob import Hyperparameters
from kubetune.api.schema import AUTO, camel_case

DEFAULT_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
"""Tiny datasets get more epochs so the model sees at least ~100 examples in total."""
MAX_TARGET_EXAMPLES = 25_000
"""Huge datasets get fewer epochs so a run sees at most ~25k examples (at least one epoch)."""
MAX_AUTO_EPOCHS = 25
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE_AT_1B = 2e-5
"""Full fine-tuning LR for a 1B-parameter model; scaled by sqrt(1e9 / params) and clamped."""
MIN_SEQ_LENGTH = 64
MAX_AUTO_SEQ_LENGTH = 1024
TARGET_SEQUENCES_PER_STEP = 16
"""Global batch (sequences per optimizer step, all devices together) that auto gradient accumulation
aims for: more devices mean less accumulation, not a larger batch, so an `auto` run optimises the same
way (and its learning rate stays right) whatever the world size."""
MIN_STEPS_PER_EPOCH = 8
"""Auto accumulation never makes an epoch shorter than this many optimizer steps."""
DEFAULT_WARMUP_RATIO = 0.03
DEFAULT_SEED = 42

DeviceKind = Literal["cpu", "cuda", "mps"]


@dataclasses.dataclass(frozen=True)
class ResolvedHyperparameters:
    """Concrete values for every hyperparameter, as recorded in metrics.json and checkpoints."""

    epochs: float
    batch_size: int
    learning_rate: float
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    dropout: float | None
    """None: the model's own dropout is kept."""
    max_seq_length: int
    gradient_accumulation_steps: int
    seed: int
    automatic: tuple[str, ...] = ()
    """camelCase names of the fields that were `auto` and resolved by these rules."""
    world_size: int = 1
    """Training processes (devices) of the run: every rank of every pod."""

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over the whole run: per-device batch × world size × accumulation."""
        return self.batch_size * self.world_size * self.gradient_accumulation_steps

    def to_report(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batchSize": self.batch_size,
            "learningRate": self.learning_rate,
            "scheduler": self.scheduler,
            "warmupRatio": self.warmup_ratio,
            "weightDecay": self.weight_decay,
            "dropout": self.dropout,
            "maxSeqLength": self.max_seq_length,
            "gradientAccumulationSteps": self.gradient_accumulation_steps,
            "seed": self.seed,
            "automatic": list(self.automatic),
            "worldSize": self.world_size,
            "globalBatchSize": self.global_batch_size,
        }

    @classmethod
    def from_report(cls, data: dict[str, Any]) -> ResolvedHyperparameters:
        return cls(
            epochs=data["epochs"],
            batch_size=data["batchSize"],
            learning_rate=data["learningRate"],
            scheduler=data["scheduler"],
            warmup_ratio=data["warmupRatio"],
            weight_decay=data["weightDecay"],
            dropout=data["dropout"],
            max_seq_length=data["maxSeqLength"],
            gradient_accumulation_steps=data["gradientAccumulationSteps"],
            seed=data["seed"],
            automatic=tuple(data.get("automatic", ())),
            world_size=int(data.get("worldSize", 1)),
        )


def auto_epochs(num_train_examples: int) -> float:
    """3 epochs; enough to see ~100 examples on tiny sets; at most ~25k examples on huge ones."""
    n = max(1, num_train_examples)
    if n * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return float(min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n)))
    if n * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return float(max(1, MAX_TARGET_EXAMPLES // n))
    return float(DEFAULT_EPOCHS)


def auto_learning_rate(method: str, num_parameters: int) -> float:
    """LoRA: 2e-4. Full: 2e-5 at 1B parameters, times sqrt(1e9 / params), within [5e-6, 1e-3]."""
    if method == "lora":
        return LORA_LEARNING_RATE
    scaled = FULL_LEARNING_RATE_AT_1B * math.sqrt(1e9 / max(1, num_parameters))
    return float(min(1e-3, max(5e-6, scaled)))


def auto_max_seq_length(longest_example_tokens: int, model_context: int | None) -> int:
    """The next power of two holding the longest example, within [64, min(1024, model context)]."""
    ceiling = min(MAX_AUTO_SEQ_LENGTH, model_context or MAX_AUTO_SEQ_LENGTH)
    length = 1 << max(0, longest_example_tokens - 1).bit_length()
    return max(min(MIN_SEQ_LENGTH, ceiling), min(length, ceiling))


def tokens_per_micro_batch(device: DeviceKind, num_parameters: int, method: str) -> int:
    """Token budget of one micro-batch: what fits comfortably on the device for this model size."""
    if device != "cuda":
        return 2048
    if num_parameters <= 200e6:
        budget = 16384
    elif num_parameters <= 1e9:
        budget = 8192
    elif num_parameters <= 3e9:
        budget = 4096
    else:
        budget = 2048
    return budget * 2 if method == "lora" else budget  # no optimizer state for frozen weights


def auto_batch_size(device: DeviceKind, num_parameters: int, method: str, max_seq_length: int) -> int:
    return max(1, tokens_per_micro_batch(device, num_parameters, method) // max_seq_length)


def auto_gradient_accumulation(batch_size: int, num_sequences: int, world_size: int = 1) -> int:
    """Micro-batches per device per step so the global batch reaches TARGET_SEQUENCES_PER_STEP, fewer when
    an epoch would otherwise have fewer than MIN_STEPS_PER_EPOCH steps."""
    """Reach ~16 sequences per step, but keep at least 8 optimizer steps per epoch."""
    wanted = max(1, math.ceil(TARGET_SEQUENCES_PER_STEP / (batch_size * world_size)))
    micro_batches_per_device = max(1, num_sequences // (batch_size * world_size))
    return max(1, min(wanted, micro_batches_per_device // MIN_STEPS_PER_EPOCH))


def resolve_max_seq_length(hp: Hyperparameters, longest_example_tokens: int, model_context: int | None) -> int:
    if hp.max_seq_length != AUTO:
        return int(hp.max_seq_length)
    return auto_max_seq_length(longest_example_tokens, model_context)


def resolve(
    hp: Hyperparameters,
    *,
    method: str,
    num_parameters: int,
    num_train_examples: int,
    num_train_sequences: int,
    max_seq_length: int,
    device: DeviceKind,
    world_size: int = 1,
) -> ResolvedHyperparameters:
    """Every hyperparameter concrete; `automatic` names those that came from these rules."""
    automatic = [camel for camel, value in _camel_fields(hp) if value == AUTO or value is None]
    batch_size = (
        int(hp.batch_size)
        if hp.batch_size != AUTO
        else auto_batch_size(device, num_parameters, method, max_seq_length)
    )
    return ResolvedHyperparameters(
        epochs=float(hp.epochs) if hp.epochs != AUTO else auto_epochs(num_train_examples),
        batch_size=batch_size,
        learning_rate=(
            float(hp.learning_rate) if hp.learning_rate is not None else auto_learning_rate(method, num_parameters)
        ),
        scheduler="cosine" if hp.scheduler == AUTO else hp.scheduler,
        warmup_ratio=float(hp.warmup_ratio) if hp.warmup_ratio is not None else DEFAULT_WARMUP_RATIO,
        weight_decay=(
            float(hp.weight_decay) if hp.weight_decay is not None else (0.0 if method == "lora" else 0.01)
        ),
        dropout=float(hp.dropout) if hp.dropout is not None else None,
        max_seq_length=max_seq_length,
        gradient_accumulation_steps=(
            int(hp.gradient_accumulation_steps)
            if hp.gradient_accumulation_steps != AUTO
            else auto_gradient_accumulation(batch_size, num_train_sequences, world_size)
        ),
        seed=int(hp.seed) if hp.seed != AUTO else DEFAULT_SEED,
        automatic=tuple(automatic),
        world_size=world_size,
    )


def resolve_seed(hp: Hyperparameters) -> int:
    return int(hp.seed) if hp.seed != AUTO else DEFAULT_SEED


def _camel_fields(hp: Hyperparameters) -> list[tuple[str, Any]]:
    return [(camel_case(f.name), getattr(hp, f.name)) for f in dataclasses.fields(hp)]
