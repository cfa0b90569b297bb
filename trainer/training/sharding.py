"""`training.strategy: fsdp` across processes: torch's FSDP2 (`fully_shard`) on each transformer block.

Each block the model class names in `_no_split_modules` becomes one shard unit, and the root module one
more (embeddings, final norm, head): every rank holds 1/world_size of each parameter (a DTensor sharded on
dim 0), of its gradient and of the AdamW state built on it. A unit's full weights are all-gathered just
before its forward and backward and freed after; gradients are reduce-scattered (averaged over ranks) on
the step's last micro-batch, so the update is the one DDP and a single process compute.

The trainer does not hand the model to `accelerator.prepare` under FSDP (that would wrap it in DDP);
accelerate still starts the process group, places tensors and runs autocast. Checkpoints hold gathered
full tensors in the same files as DDP and single-process runs (trainable.safetensors by parameter
name); only optimizer.pt differs, keyed by parameter name (torch.distributed.checkpoint's full optimizer
state dict) instead of by position. Every rank reads the full files on resume and keeps its own shard.

Runs on CPU with gloo (what the tests use) and on GPUs with nccl: `fully_shard` takes the device mesh of
accelerate's device type.
"""

from __future__ import annotations

from typing import Any

import torch

FSDP_OPTIMIZER_FORMAT = "fsdp-full-by-name"
"""Recorded in trainer_state.json: optimizer.pt holds the gathered optimizer state keyed by parameter name."""


def is_sharded(model: Any) -> bool:
    """True when `model` was wrapped by `shard_model`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: Any, *, device: torch.device, world_size: int, precision: str) -> int:
    """Wrap each transformer block and then the root with `fully_shard`, in place; returns how many blocks.

    `precision` is accelerate's mixed_precision value: bf16 or fp16 all-gather the weights in that type for
    compute (master weights and optimizer state stay fp32) and reduce gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_names = set(getattr(_base_model(model), "_no_split_modules", None) or [])
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()
    if precision in ("bf16", "fp16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                                      reduce_dtype=torch.float32)
    model.to(device)
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        # sizing.fsdp_wrap_problem refuses such models at validation; a class that lost its names since is
        # a programming error, not a user's.
        raise RuntimeError(f"fsdp: no module of {type(model).__name__} is one of its blocks {sorted(block_names)}")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return len(blocks)


def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (which names no blocks itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def reshard(model: Any) -> None:
    """Register the sharded parameters again. FSDP2 keeps the root unit's weights gathered after a forward
    without backward (an evaluation) until the next step; state dicts and loads need the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Every trainable parameter, gathered to its full shape, on the CPU. A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    state = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            state[name] = full.detach().to("cpu").contiguous().clone()
    return state


def load_full_tensor(parameter: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy this rank's part of the full `tensor` into `parameter` (a DTensor shard or a plain tensor); no
    communication: every rank holds the full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensor = tensor.to(_local(parameter).device, parameter.dtype)
    if isinstance(parameter, DTensor):
        tensor = distribute_tensor(tensor, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
    with torch.no_grad():
        _local(parameter).copy_(tensor)


def full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state gathered to full tensors on the CPU, keyed by parameter name; complete on rank 0
    (empty elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_optimizer_state_dict(model, optimizer, options=options))


def load_full_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a `full_optimizer_state` that every rank read; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    reshard(model)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(model: Any, max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm`; returns the norm before.

    The shards of a parameter are disjoint, so the squared norm is the sum over ranks of each rank's local
    squares (one all-reduce); every rank scales its shards by the same factor."""
    import torch.distributed as dist

    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squares += grad.detach().float().pow(2).sum()
    dist.all_reduce(squares)
    norm = squares.sqrt()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(factor.to(grad.dtype))
    return norm


def set_gradient_sync(model: Any, enabled: bool) -> None:
    """Reduce-scatter gradients after this backward (the step's last micro-batch) or keep accumulating."""
    model.set_requires_gradient_sync(enabled)


def full_model_state(model: Any) -> dict[str, Any]:
    """The whole model's state dict with full tensors, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False)))
