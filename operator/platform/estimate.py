"""How much GPU memory and time a fine-tuning run needs, and which GPUs to give it (pure, no torch).

Inputs are facts the operator can get without loading weights: the base
model's configuration (`ModelFacts`, from config.json, or measured exactly by
the dataset-validation pod, see `kubetune.trainer.training.sizing`), the training shape
(`TrainingShape`: method, precision, sequence length, micro-batch, gradient
checkpointing, optimizer) and the dataset's token count. The formula, term by
term, is in docs/sizing.md; in short, per device (data-parallel replicas each
hold everything):

    weights      = parameters × bytes per weight (fp32 4; bf16-LoRA base 2)
    gradients    = trainable × 4            (master weights and adapters are fp32)
    optimizer    = trainable × 8            (AdamW: two fp32 moments)
    autocast     = parameters × 2           (full fine-tuning under bf16/fp16: cached half copies)
    activations  = layers × batch × seq × (bytes × (A·hidden + M·intermediate) + eager attention term)
                   (gradient checkpointing: one hidden state per layer, plus one layer in full)
    logits       = batch × seq × vocab × (bytes + 8)   (logits, fp32 copy, fp32 log-softmax)
    overhead     = framework constant (CUDA context and allocator slack on GPUs)

Serving: weights in bf16 (fp32 on CPU) + the KV cache of `concurrency`
sequences of `tokens` each (2 × layers × kv heads × head size × bytes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kubetune.api.finetunejob import FineTuneJobSpec, ResourcesSpec

GIB = 1024**3
MIB = 1024**2

Method = Literal["full", "lora"]
Precision = Literal["fp32", "bf16", "fp16"]
AttentionKind = Literal["sdpa", "eager"]

ADAMW_BYTES_PER_TRAINABLE = 8
"""AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per trainable parameter."""
GRADIENT_BYTES_PER_TRAINABLE = 4
"""Gradients are fp32: full fine-tuning keeps fp32 master weights, peft keeps adapters in fp32."""
AUTOCAST_CACHE_BYTES = 2
"""torch.autocast caches a half-precision copy of every fp32 weight it casts inside the forward pass."""
ACTIVATION_HIDDEN_FACTOR = 10
"""Hidden-sized tensors each layer keeps for the backward pass, per token: norm inputs and outputs (4),
q/k/v (3), attention output (1), the two residual inputs to the projections (2). GQA's smaller k/v and
fused kernels move this by a few units; measured on GPT-2 and Llama shapes (docs/sizing.md)."""
ACTIVATION_MLP_FACTOR = 2
"""Intermediate-sized tensors per token and layer: the up projection and the activation's output (a gated
MLP keeps gate, up, activation and product: 4, see `ModelFacts.gated_mlp`)."""
EAGER_ATTENTION_FACTOR = 2
"""Eager attention keeps the attention probabilities and their pre-softmax scores (heads × seq² each);
SDPA/flash kernels keep none (they recompute)."""
DROPOUT_ATTENTION_FACTOR = 4
"""With attention dropout on a materialising path (eager, or SDPA on CPU, whose fused kernels do not
do dropout), four value-sized copies of the heads × seq² scores plus a one-byte mask are kept
(measured on CPU: 17.5 bytes per fp32 score)."""
PYTHON_GELU_EXTRA = 7
"""GPT-2's `gelu_new` is written in Python (0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))): autograd keeps
about seven more intermediate-sized tensors per token and layer than a fused activation (measured)."""
LOGIT_FP32_COPIES = 2
"""The loss upcasts the logits to fp32 and keeps the fp32 log-softmax for the backward pass."""
GPU_OVERHEAD_BYTES = 1 * GIB
"""CUDA context, cuBLAS workspaces and allocator slack on a GPU."""
CPU_OVERHEAD_BYTES = 64 * MIB
"""Allocator slack and temporaries of a CPU step beyond the terms above."""
FRAGMENTATION = 0.10
"""Extra fraction on top of the modelled bytes for allocator fragmentation on GPUs."""
MODEL_FLOPS_UTILISATION = 0.35
"""Fraction of a GPU's peak dense bf16 FLOP/s a fine-tuning step achieves (typical 0.3–0.5)."""
CPU_FLOPS = 2.0e10
"""Sustained FLOP/s of a CPU trainer pod (a few cores, fp32), for the CPU ETA."""
DEFAULT_GPU_TFLOPS = 100.0
"""Peak dense bf16 TFLOP/s assumed for a GPU type that does not say (between an A10 and an A100)."""
SERVING_CONCURRENCY = 8
"""Concurrent sequences the serving estimate holds a KV cache for (the built-in server's default)."""


class EstimateError(ValueError):
    """Facts that cannot make an estimate; the message names the field and what was expected."""


# --- model facts ---------------------------------------------------------------------------------

# Names the configs of common architectures use for the same facts (first match wins).
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "n_head_kv", "num_kv_heads", "multi_query_group_num")
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len")
_GATED_MLP_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                    "olmo", "olmo2", "smollm3", "granite", "cohere", "deepseek_v2", "deepseek_v3"}
_LEARNED_POSITION_TYPES = {"gpt2", "opt", "gpt_bigcode", "gptj"}
_BIASED_TYPES = {"gpt2", "gpt_neox", "opt", "bloom", "falcon", "gpt_bigcode", "phi"}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know about the base model."""

    parameters: int
    """All parameters of the causal LM (embeddings included, tied ones counted once)."""
    layers: int
    """Transformer blocks."""
    hidden_size: int
    """Width of the residual stream."""
    vocab_size: int
    """Rows of the output head (logits per token)."""
    attention_heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (fewer than `attention_heads` with grouped-query attention)."""
    intermediate_size: int
    """Width of the MLP."""
    context_length: int = 0
    """Longest sequence the model accepts; 0 = unknown."""
    model_type: str = ""
    """`model_type` from config.json (e.g. `gpt2`, `llama`)."""
    gated_mlp: bool = False
    """The MLP is gated (SwiGLU: gate, up, down projections), as in Llama."""
    python_gelu: bool = False
    """The MLP activation is GPT-2's Python `gelu_new` (keeps many temporaries for the backward pass)."""
    attention_dropout: bool = False
    """Attention dropout is on (probability > 0): non-fused attention kernels keep the scores."""
    lora_inputs_outputs: int = 0
    """Sum of (in + out features) over every module LoRA adapts, all layers: LoRA trainable parameters
    are rank × this. 0 = derive from the default targets of the architecture."""

    @property
    def head_size(self) -> int:
        return self.hidden_size // max(1, self.attention_heads)

    def lora_trainable(self, rank: int) -> int:
        """Trainable parameters of LoRA adapters of this rank on the default target modules."""
        return rank * (self.lora_inputs_outputs or default_lora_inputs_outputs(self))

    def to_report(self) -> dict[str, Any]:
        """camelCase JSON, as the validation pod reports it."""
        return {_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_report(cls, data: Mapping[str, Any], path: str = "model") -> ModelFacts:
        """Read `to_report` output back; EstimateError names a missing or bad field."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = _camel(field.name)
            if key not in data:
                if field.default is dataclasses.MISSING:
                    raise EstimateError(f"{path}.{key}: missing")
                continue
            value = data[key]
            expected: type = str if field.name == "model_type" else bool if field.type == "bool" else int
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise EstimateError(f"{path}.{key}: must be {expected.__name__}, got {value!r}")
            values[field.name] = value
        facts = cls(**values)
        facts.check(path)
        return facts

    def check(self, path: str = "model") -> None:
        for name in ("parameters", "layers", "hidden_size", "vocab_size", "attention_heads", "kv_heads",
                     "intermediate_size"):
            if getattr(self, name) <= 0:
                raise EstimateError(f"{path}.{_camel(name)}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelFacts:
        """Facts from a Hugging Face config.json; the parameter count is computed from the shapes
        (exact for GPT-2 and Llama-style models, approximate for others)."""
        model_type = str(config.get("model_type") or "")
        text_config = config.get("text_config")
        if isinstance(text_config, Mapping) and not any(k in config for k in _HIDDEN_KEYS):
            return cls.from_config({"model_type": model_type, **text_config})
        hidden = _first_int(config, _HIDDEN_KEYS, "hidden size")
        layers = _first_int(config, _LAYER_KEYS, "layer count")
        heads = _first_int(config, _HEAD_KEYS, "attention heads")
        vocab = _first_int(config, ("vocab_size", "n_vocab", "padded_vocab_size"), "vocabulary size")
        kv_heads = _first_int(config, _KV_HEAD_KEYS, "", default=heads)
        intermediate = _first_int(config, _INTERMEDIATE_KEYS, "", default=4 * hidden)
        context = _first_int(config, _CONTEXT_KEYS, "", default=0)
        gated = model_type in _GATED_MLP_TYPES or str(config.get("hidden_act", "")) in ("silu", "swiglu")
        activation = str(config.get("activation_function") or config.get("hidden_act") or "")
        dropout = config.get("attn_pdrop", config.get("attention_dropout", 0.0))
        python_gelu = activation == "gelu_new" or (model_type == "gpt2" and not activation)
        attention_dropout = isinstance(dropout, (int, float)) and dropout > 0 or (
            model_type == "gpt2" and "attn_pdrop" not in config)  # GPT2Config's default is 0.1
        tied = bool(config.get("tie_word_embeddings", True))
        head_size = int(config.get("head_dim") or hidden // heads)
        kv_width = kv_heads * head_size
        biased = model_type in _BIASED_TYPES or bool(config.get("attention_bias"))
        attention = hidden * (heads * head_size) * 2 + hidden * kv_width * 2
        attention_bias = (heads * head_size + 2 * kv_width + hidden) if biased else 0
        mlp = (3 if gated else 2) * hidden * intermediate
        mlp_bias = (intermediate + hidden) if (model_type in _BIASED_TYPES or config.get("mlp_bias")) else 0
        norms = (4 if biased else 2) * hidden  # LayerNorm has a bias, RMSNorm does not
        per_layer = attention + attention_bias + mlp + mlp_bias + norms
        embeddings = vocab * hidden * (1 if tied else 2)
        positions = context * hidden if model_type in _LEARNED_POSITION_TYPES else 0
        final_norm = (2 if biased else 1) * hidden
        parameters = layers * per_layer + embeddings + positions + final_norm
        return cls(parameters=parameters, layers=layers, hidden_size=hidden, vocab_size=vocab,
                   attention_heads=heads, kv_heads=kv_heads, intermediate_size=intermediate,
                   context_length=context, model_type=model_type, gated_mlp=gated, python_gelu=python_gelu,
                   attention_dropout=bool(attention_dropout))


def default_lora_inputs_outputs(facts: ModelFacts) -> int:
    """Σ(in + out) over the trainer's default LoRA targets (kubetune.trainer.training.modeling.DEFAULT_LORA_TARGETS)."""
    h, i = facts.hidden_size, facts.intermediate_size
    kv = facts.kv_heads * facts.head_size
    if facts.model_type == "gpt2":
        # c_attn (h -> 3h), and "c_proj" matches both the attention (h -> h) and the MLP (i -> h) projection.
        per_layer = (h + 3 * h) + (h + h) + (i + h)
    elif facts.model_type in ("gpt_neox", "falcon", "bloom"):
        per_layer = (h + 3 * h) + (h + h)
    elif facts.model_type == "phi3":
        per_layer = (h + h + 2 * kv) + (h + h)
    elif facts.model_type in _GATED_MLP_TYPES or facts.model_type in ("gptj", "opt"):
        per_layer = (h + h) + 2 * (h + kv) + (h + h)  # q, k, v, o
    else:
        # peft's "all-linear": every projection of attention and MLP.
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + (3 if facts.gated_mlp else 2) * (h + i)
    return facts.layers * per_layer


def _first_int(config: Mapping[str, Any], keys: Sequence[str], what: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is not None:
        return default
    raise EstimateError(f"config.json: no {what} (looked for {', '.join(keys)})")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# --- the training shape --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingShape:
    """How the model is trained: everything besides the model that decides memory."""

    method: Method = "lora"
    """`full` updates every weight; `lora` trains adapters on frozen weights."""
    lora_rank: int = 8
    """LoRA rank (method `lora`)."""
    precision: Precision = "bf16"
    """Compute precision (auto resolves to bf16 on GPUs, fp32 on CPU)."""
    seq_length: int = 1024
    """Tokens per sequence (`maxSeqLength`)."""
    micro_batch: int = 1
    """Sequences per device per forward pass (`batchSize`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """The optimizer: AdamW (the trainer's) keeps two moments; plain SGD none."""
    attention: AttentionKind = "sdpa"
    """Attention kernel: `sdpa` (transformers' default; no seq² tensors kept) or `eager`."""
    device: Literal["gpu", "cpu"] = "gpu"
    """Where it runs: decides the fixed overhead and fragmentation allowance."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism (`training.strategy`): `ddp` replicates the model on every device; `fsdp` shards
    weights, gradients and optimizer state over the world."""
    world_size: int = 1
    """Devices of the run (GPUs per pod × pods); 1 = no data parallelism."""

    def check(self) -> None:
        problems = [f"{name}: must be > 0, got {getattr(self, name)}" for name in ("lora_rank", "seq_length", "micro_batch")
                    if getattr(self, name) <= 0]
        if problems:
            raise EstimateError("; ".join(problems))


def _activation_bytes(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


def _weight_bytes(shape: TrainingShape) -> int:
    # The trainer loads frozen LoRA base weights in bf16 under bf16; everything else keeps fp32 weights.
    return 2 if shape.method == "lora" and shape.precision == "bf16" else 4


@dataclasses.dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device, term by term."""

    weights: int
    gradients: int
    optimizer: int
    autocast_cache: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.autocast_cache + self.activations
                + self.logits + self.overhead)

    def to_report(self) -> dict[str, int]:
        return {_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)} | {"total": self.total}


def trainable_parameters(facts: ModelFacts, shape: TrainingShape) -> int:
    return facts.parameters if shape.method == "full" else facts.lora_trainable(shape.lora_rank)


def activation_bytes_per_layer(facts: ModelFacts, shape: TrainingShape) -> int:
    """What one transformer block keeps for its backward pass (all sequences of the micro-batch)."""
    tokens = shape.micro_batch * shape.seq_length
    mlp_factor = 4 if facts.gated_mlp else ACTIVATION_MLP_FACTOR
    if facts.python_gelu:
        mlp_factor += PYTHON_GELU_EXTRA
    value = _activation_bytes(shape.precision)
    per_token = value * (ACTIVATION_HIDDEN_FACTOR * facts.hidden_size + mlp_factor * facts.intermediate_size)
    scores = shape.micro_batch * facts.attention_heads * shape.seq_length**2
    materialised = shape.attention == "eager" or (facts.attention_dropout and shape.device == "cpu")
    attention = 0
    if materialised and facts.attention_dropout:
        attention = scores * (DROPOUT_ATTENTION_FACTOR * value + 1)
    elif materialised:
        attention = scores * EAGER_ATTENTION_FACTOR * value
    return tokens * per_token + attention


def training_memory(facts: ModelFacts, shape: TrainingShape) -> MemoryBreakdown:
    """Peak memory of one training step on one device (data-parallel replicas each need this much)."""
    facts.check()
    shape.check()
    trainable = trainable_parameters(facts, shape)
    tokens = shape.micro_batch * shape.seq_length
    per_layer = activation_bytes_per_layer(facts, shape)
    if shape.gradient_checkpointing:
        # Each block keeps only its input; the block being recomputed holds its full activations.
        activations = facts.layers * tokens * facts.hidden_size * _activation_bytes(shape.precision) + per_layer
    else:
        activations = facts.layers * per_layer
    logits = tokens * facts.vocab_size * (_activation_bytes(shape.precision) + 4 * LOGIT_FP32_COPIES)
    mixed = shape.precision != "fp32"
    weights, gradients, optimizer, autocast_cache = _data_parallel_state(
        shape, weights=facts.parameters * _weight_bytes(shape), gradients=trainable * GRADIENT_BYTES_PER_TRAINABLE,
        optimizer=trainable * ADAMW_BYTES_PER_TRAINABLE if shape.optimizer == "adamw" else 0,
        autocast_cache=facts.parameters * AUTOCAST_CACHE_BYTES if mixed and shape.method == "full" else 0,
        layers=facts.layers)
    modelled = weights + gradients + optimizer + autocast_cache + activations + logits
    overhead = (GPU_OVERHEAD_BYTES + int(FRAGMENTATION * modelled)) if shape.device == "gpu" else CPU_OVERHEAD_BYTES
    return MemoryBreakdown(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        autocast_cache=autocast_cache,
        activations=activations,
        logits=logits,
        overhead=overhead,
    )


FSDP_GATHERED_BLOCKS = 2
"""Blocks FSDP holds unsharded at once: the one computing and the one prefetched."""


def _data_parallel_state(shape: TrainingShape, *, weights: int, gradients: int, optimizer: int, autocast_cache: int,
                         layers: int) -> tuple[int, int, int, int]:
    """Per-device weights, gradients, optimizer state and autocast cache under the strategy and world size.

    DDP (world > 1) keeps a whole replica and adds its gradient buckets (a second copy of the trainable
    gradients, which torch's DDP all-reduces). FSDP keeps 1/world of each, plus the blocks it has
    gathered for the computation at hand (FSDP_GATHERED_BLOCKS of the model's layers, whole)."""
    world = max(1, shape.world_size)
    if world == 1:
        return weights, gradients, optimizer, autocast_cache
    if shape.strategy == "ddp":
        return weights, 2 * gradients, optimizer, autocast_cache
    gathered = min(1.0, FSDP_GATHERED_BLOCKS / max(1, layers))
    return (math.ceil(weights / world) + int(weights * gathered), math.ceil(gradients / world)
            + int(gradients * gathered), math.ceil(optimizer / world), math.ceil(autocast_cache / world))


def serving_memory(facts: ModelFacts, *, tokens: int, concurrency: int = SERVING_CONCURRENCY,
                   device: Literal["gpu", "cpu"] = "gpu") -> int:
    """Weights (bf16 on GPUs, fp32 on CPU) plus the KV cache of `concurrency` sequences of `tokens`."""
    facts.check()
    value_bytes = 2 if device == "gpu" else 4
    kv_cache = 2 * facts.layers * facts.kv_heads * facts.head_size * value_bytes * tokens * concurrency
    overhead = GPU_OVERHEAD_BYTES if device == "gpu" else CPU_OVERHEAD_BYTES
    return facts.parameters * value_bytes + kv_cache + overhead


def tokens_to_process(dataset_tokens: int, epochs: float) -> int:
    """Training tokens the run will push through the model (dataset tokens × epochs)."""
    return int(math.ceil(max(0, dataset_tokens) * max(0.0, epochs)))


def flops_per_token(facts: ModelFacts, shape: TrainingShape) -> float:
    """Forward 2P, backward 4P (full) or 2P (LoRA: no weight gradients for frozen weights), plus 2P
    when gradient checkpointing recomputes the forward pass."""
    backward = 4 if shape.method == "full" else 2
    recompute = 2 if shape.gradient_checkpointing else 0
    return float((2 + backward + recompute) * facts.parameters)


def eta_seconds(facts: ModelFacts, shape: TrainingShape, tokens: int, *, gpus: int, tflops: float) -> float:
    """Seconds of training for `tokens` on `gpus` GPUs of `tflops` peak (0 GPUs: the CPU rate)."""
    rate = gpus * tflops * 1e12 * MODEL_FLOPS_UTILISATION if gpus > 0 else CPU_FLOPS
    return tokens * flops_per_token(facts, shape) / rate


# --- quantities ----------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def quantity_bytes(value: int | str) -> int:
    """Bytes of a Kubernetes memory quantity (`32Gi`, `500M`, `1073741824`)."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise EstimateError(f"not a memory quantity: {value!r} (use e.g. 16Gi or 500M)")
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])


def human_bytes(count: int | float) -> str:
    """`12.3 GiB`, `640 MiB`."""
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / MIB:.0f} MiB"


# --- choosing GPUs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuType:
    """A GPU model the cluster's node pools offer (platform policy `gpuTypes`)."""

    name: str
    """Name shown in status and messages, e.g. `A100-40GB`."""
    memory_gib: float
    """Memory of one GPU, GiB."""
    max_per_node: int = 8
    """GPUs of this type on one node (a trainer pod never spans nodes)."""
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Node labels that put a pod on this type, e.g. `nvidia.com/gpu.product: NVIDIA-A100-SXM4-40GB`."""
    tflops: float = DEFAULT_GPU_TFLOPS
    """Peak dense bf16 TFLOP/s of one GPU (for the ETA)."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def label(self) -> str:
        return f"{self.name} ({self.memory_gib:g} GiB)"


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What the trainer pod should get, or why nothing fits."""

    fits: bool
    gpus: int
    """GPUs per trainer pod (0 = CPU)."""
    gpu_type: GpuType | None = None
    """The GPU type chosen (None on CPU, or when no types are configured)."""
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Node labels to add to the trainer pod so it lands on `gpu_type`."""
    message: str = ""
    """For humans: the choice, or why the job cannot fit and what would."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What the job asked for (`spec.resources`)."""

    gpus: int | Literal["auto"] = 0
    memory_bytes: int = 0
    """The pod's memory limit; 0 = none set."""
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _selects(job_selector: Mapping[str, str], gpu_type: GpuType) -> bool:
    """Whether the job's node selector pins this GPU type (it names every label of the type's selector)."""
    return bool(gpu_type.node_selector) and all(job_selector.get(k) == v for k, v in gpu_type.node_selector.items())


def recommend(request: Request, *, gpu_bytes: int, cpu_bytes: int, gpu_types: Sequence[GpuType],
              eta_for: Any = None, target_seconds: float = 0.0, max_useful_gpus: int = 0) -> Recommendation:
    """GPUs (and type) for a job whose training step needs `gpu_bytes` per GPU or `cpu_bytes` on CPU.

    `auto`: without GPU types, CPU; with them, the type with the least memory that fits and the fewest
    GPUs (more only to meet `target_seconds`, via `eta_for(gpus, tflops)`, and never more than
    `max_useful_gpus` when set: the trainer runs one rank per GPU, and each rank needs a micro-batch of its
    own in every step, so a GPU beyond that would sit idle). A fixed count: the job fits
    when some type offering that many GPUs per node has the memory. CPU: the memory limit, if set.
    """
    if request.gpus == "auto" and not gpu_types:
        return _cpu(request, cpu_bytes, "gpus: auto and the platform lists no GPU types: training on CPU")
    if request.gpus == 0:
        return _cpu(request, cpu_bytes, "no GPUs requested: training on CPU")
    wanted = 1 if request.gpus == "auto" else int(request.gpus)
    if not gpu_types:
        return Recommendation(True, wanted, message=f"{wanted} GPU(s) requested; the platform lists no GPU "
                                                    f"types, so GPU memory is not checked")
    pinned = [t for t in gpu_types if _selects(request.node_selector, t)]
    candidates = sorted(pinned or gpu_types, key=lambda t: (t.memory_gib, t.name))
    offered = [t for t in candidates if t.max_per_node >= wanted]
    fitting = [t for t in offered if t.memory_bytes >= gpu_bytes]
    if not fitting:
        return Recommendation(False, wanted, message=_no_fit_message(gpu_bytes, wanted, candidates, gpu_types))
    chosen = fitting[0]
    gpus = wanted
    if request.gpus == "auto" and target_seconds > 0 and eta_for is not None:
        most = min(chosen.max_per_node, max_useful_gpus) if max_useful_gpus > 0 else chosen.max_per_node
        gpus = next((n for n in range(1, most + 1) if eta_for(n, chosen.tflops) <= target_seconds), most)
    # Pin the type only when a smaller one would not fit (or auto chose it): never narrow placement needlessly.
    pin = not pinned and (request.gpus == "auto" or len(fitting) < len(offered))
    selector = dict(chosen.node_selector) if pin else {}
    return Recommendation(True, gpus, chosen, selector,
                          f"{gpus}× {chosen.label()}: needs {human_bytes(gpu_bytes)} per GPU")


def _cpu(request: Request, cpu_bytes: int, why: str) -> Recommendation:
    if request.memory_bytes and cpu_bytes > request.memory_bytes:
        return Recommendation(False, 0, message=(
            f"{why}, which needs about {human_bytes(cpu_bytes)} of memory but resources.memory is "
            f"{human_bytes(request.memory_bytes)}; would fit: resources.memory of at least "
            f"{math.ceil(cpu_bytes * 1.2 / GIB)}Gi"))
    return Recommendation(True, 0, message=f"{why} (about {human_bytes(cpu_bytes)} of memory)")


def _no_fit_message(gpu_bytes: int, wanted: int, candidates: Sequence[GpuType], all_types: Sequence[GpuType]) -> str:
    largest = max(candidates, key=lambda t: t.memory_gib)
    text = f"needs about {human_bytes(gpu_bytes)} per GPU"
    offered = [t for t in candidates if t.max_per_node >= wanted]
    if not offered:
        return (f"{text}, and no GPU type offers {wanted} GPUs on one node (most: "
                f"{max(t.max_per_node for t in candidates)} of {largest.label()})")
    text += f"; the largest GPU type available to it is {largest.label()}"
    bigger = sorted((t for t in all_types if t.memory_bytes >= gpu_bytes and t not in candidates),
                    key=lambda t: t.memory_gib)
    if bigger:
        text += f"; would fit: {bigger[0].label()} (set resources.nodeSelector to {dict(bigger[0].node_selector)})"
    return text


# --- the whole plan ------------------------------------------------------------------------------

_ALTERNATIVES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("training.gradientCheckpointing: true", {"gradient_checkpointing": True}),
    ("method.type: lora", {"method": "lora"}),
    ("method.type: lora with gradientCheckpointing", {"method": "lora", "gradient_checkpointing": True}),
    ("hyperparameters.batchSize: 1 with gradientCheckpointing", {"micro_batch": 1, "gradient_checkpointing": True}),
    ("method.type: lora, batchSize: 1, gradientCheckpointing",
     {"method": "lora", "micro_batch": 1, "gradient_checkpointing": True}),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The estimate of one job and the resources it gets."""

    train_bytes_per_device: int
    """Peak training memory on each device the job uses (a GPU, or the CPU pod)."""
    breakdown: MemoryBreakdown
    serve_bytes: int
    tokens: int
    """Tokens to process: dataset tokens × epochs."""
    recommendation: Recommendation
    eta_seconds: float

    @property
    def fits(self) -> bool:
        return self.recommendation.fits

    def to_status(self) -> dict[str, Any]:
        """`status.estimate` (camelCase, JSON-ready)."""
        gpu_type = self.recommendation.gpu_type
        status: dict[str, Any] = {
            "trainMemoryBytesPerDevice": self.train_bytes_per_device,
            "serveMemoryBytes": self.serve_bytes,
            "tokensToProcess": self.tokens,
            "gpus": self.recommendation.gpus,
            "etaSeconds": round(self.eta_seconds, 1),
            "message": self.recommendation.message[:1024],
        }
        if gpu_type is not None:
            status["gpuType"] = gpu_type.name
        return status

    def summary(self) -> str:
        return (f"training needs about {human_bytes(self.train_bytes_per_device)} per device "
                f"(weights {human_bytes(self.breakdown.weights)}, optimizer+gradients "
                f"{human_bytes(self.breakdown.optimizer + self.breakdown.gradients)}, activations+logits "
                f"{human_bytes(self.breakdown.activations + self.breakdown.logits)}); serving about "
                f"{human_bytes(self.serve_bytes)}; {self.tokens} tokens to process")


def plan(facts: ModelFacts, shape: TrainingShape, *, dataset_tokens: int, epochs: float, request: Request,
         gpu_types: Sequence[GpuType] = (), target_seconds: float = 0.0,
         cpu_shape: TrainingShape | None = None, max_useful_gpus: int = 0) -> Plan:
    """Estimate the job and choose its resources; a job that does not fit says what would.

    `shape` is the GPU training shape; `cpu_shape` (default: `shape` in fp32 on CPU) the CPU one.
    """
    gpu_shape = dataclasses.replace(shape, device="gpu")
    cpu_shape = cpu_shape or dataclasses.replace(shape, device="cpu", precision="fp32")
    gpu_memory = training_memory(facts, gpu_shape)
    cpu_memory = training_memory(facts, cpu_shape)
    tokens = tokens_to_process(dataset_tokens, epochs)

    def eta_for(gpus: int, tflops: float) -> float:
        return eta_seconds(facts, gpu_shape if gpus else cpu_shape, tokens, gpus=gpus, tflops=tflops)

    chosen = recommend(request, gpu_bytes=gpu_memory.total, cpu_bytes=cpu_memory.total, gpu_types=gpu_types,
                       eta_for=eta_for, target_seconds=target_seconds, max_useful_gpus=max_useful_gpus)
    on_gpu = chosen.gpus > 0
    if not chosen.fits:
        chosen = dataclasses.replace(chosen, message=chosen.message + _alternatives(
            facts, gpu_shape if on_gpu else cpu_shape, request, gpu_types))
    breakdown = gpu_memory if on_gpu else cpu_memory
    tflops = chosen.gpu_type.tflops if chosen.gpu_type else DEFAULT_GPU_TFLOPS
    serve_tokens = shape.seq_length
    serve = serving_memory(facts, tokens=serve_tokens, device="gpu" if on_gpu else "cpu")
    return Plan(breakdown.total, breakdown, serve, tokens, chosen, eta_for(chosen.gpus, tflops))


def _alternatives(facts: ModelFacts, shape: TrainingShape, request: Request, gpu_types: Sequence[GpuType]) -> str:
    """'; would also fit: …' naming the first setting changes that make the job fit as requested."""
    found = []
    for text, change in _ALTERNATIVES:
        if change.get("method") == shape.method or (change.get("micro_batch") == shape.micro_batch
                                                     and "method" not in change):
            continue
        changed = dataclasses.replace(shape, **change)
        if changed == shape:
            continue
        other = dataclasses.replace(changed, device="cpu" if shape.device == "cpu" else "gpu")
        bytes_needed = training_memory(facts, other).total
        if recommend(request, gpu_bytes=bytes_needed, cpu_bytes=bytes_needed, gpu_types=gpu_types).fits:
            found.append(f"{text} (about {human_bytes(bytes_needed)})")
        if len(found) == 2:
            break
    return "; with the same resources it would fit with " + " or ".join(found) if found else ""


# --- from a FineTuneJob and the validation pod's facts -----------------------------------------------


def facts_from_sizing(sizing: Mapping[str, Any]) -> ModelFacts:
    """ModelFacts from the validation pod's `sizing.model` report (config keys plus exact counts)."""
    model = sizing.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("config"), Mapping):
        raise EstimateError("sizing.model.config: missing")
    facts = ModelFacts.from_config(model["config"])
    # The pod counted these exactly on the real architecture; the config-derived ones are the fallback.
    return dataclasses.replace(facts, parameters=_int_or(model.get("parameters"), facts.parameters),
                               lora_inputs_outputs=_int_or(model.get("loraInputsOutputs"), facts.lora_inputs_outputs))


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def shape_for(spec: FineTuneJobSpec, resolved: Mapping[str, Any], device: Literal["gpu", "cpu"]) -> TrainingShape:
    """The training shape of a FineTuneJob spec, with `resolved` = the trainer's resolved
    {epochs, batchSize, maxSeqLength} for that device."""
    precision = spec.training.precision
    return TrainingShape(
        method=spec.method.type,
        lora_rank=spec.method.lora_settings().rank,
        precision=("bf16" if device == "gpu" else "fp32") if precision == "auto" else precision,
        seq_length=_int_or(resolved.get("maxSeqLength"), 1024),
        micro_batch=_int_or(resolved.get("batchSize"), 1),
        gradient_checkpointing=spec.training.gradient_checkpointing,
        device=device,
        strategy=spec.training.strategy,
        world_size=spec.resource_settings().world_size() if device == "gpu" else 1,
    )


def request_of(spec: FineTuneJobSpec) -> Request:
    """What `spec.resources` asks for."""
    resources = spec.resource_settings()
    return Request(
        gpus="auto" if resources.gpus_auto else resources.gpu_count(),
        memory_bytes=quantity_bytes(resources.memory) if resources.memory is not None else 0,
        node_selector=dict(resources.node_selector or {}),
    )


def with_resolved_gpus(resources: ResourcesSpec, known_gpus: Any, default: int) -> ResourcesSpec:
    """`resources` with `gpus: auto` replaced by the operator's choice: `known_gpus` (the estimate's,
    `status.estimate.gpus`) when it is a count, else `default`. Any other request is returned as it is.
    Every reader of a job's GPUs after its estimate (the trainer Job, the quota) goes through this."""
    if not resources.gpus_auto:
        return resources
    chosen = known_gpus if isinstance(known_gpus, int) and not isinstance(known_gpus, bool) and known_gpus >= 0 \
        else default
    return dataclasses.replace(resources, gpus=chosen)


def plan_for_job(spec: FineTuneJobSpec, sizing: Mapping[str, Any], *, gpu_types: Sequence[GpuType] = (),
                 target_seconds: float = 0.0) -> Plan:
    """The plan for a FineTuneJob spec from the validation pod's sizing report."""
    facts = facts_from_sizing(sizing)
    hyper = sizing.get("hyperparameters") or {}
    data = sizing.get("data") or {}
    gpu_resolved, cpu_resolved = hyper.get("gpu") or {}, hyper.get("cpu") or {}
    request = request_of(spec)
    on_gpu = request.gpus == "auto" and bool(gpu_types) or (request.gpus != "auto" and request.gpus > 0)
    epochs = (gpu_resolved if on_gpu else cpu_resolved).get("epochs")
    gpu_shape = shape_for(spec, gpu_resolved, "gpu")
    return plan(facts, gpu_shape, cpu_shape=shape_for(spec, cpu_resolved, "cpu"),
                dataset_tokens=_int_or(data.get("trainTokens"), 0),
                epochs=float(epochs) if isinstance(epochs, (int, float)) else 1.0,
                request=request, gpu_types=gpu_types, target_seconds=target_seconds,
                max_useful_gpus=micro_batches_per_epoch(_int_or(data.get("trainTokens"), 0), gpu_shape))


def micro_batches_per_epoch(train_tokens: int, shape: TrainingShape) -> int:
    """Packed micro-batches in one epoch: the most ranks that can each get one per step (0 = unknown)."""
    if train_tokens <= 0:
        return 0
    return max(1, math.ceil(train_tokens / (shape.seq_length * shape.micro_batch)))
