"""The training loss without vocabulary-sized logits: a fused linear cross-entropy over the target tokens only.

A causal LM's forward ends in `logits = lm_head(hidden)`, a (batch, length,
vocabulary) tensor that the usual loss then copies to fp32 and keeps for the
backward pass: for a 128k vocabulary that one tensor outweighs the rest of a
small model's activations. Here the output head is skipped during the model's
forward (a pre-hook on the output embeddings captures its input and hands it
an empty slice), and `FusedLinearCrossEntropy` computes, chunk by chunk over
the target tokens, the logits, the loss and both gradients at once (the
Liger-kernel idea, in plain PyTorch): the backward pass only scales the
gradients stored by the forward, nothing is recomputed, and at most one
chunk of logits (about `CHUNK_ELEMENTS` values) exists at a time. Positions
without a target (prompts, padding, the first token of each packed example)
are never projected onto the vocabulary at all.

The forward still goes through the model's own `__call__` (and so through
DDP's and accelerate's wrappers), so multi-process gradient synchronisation
is unchanged. Architectures whose head does more than a bias-free linear
projection (logit soft-capping, logit scaling) use the plain path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from kubetune.trainer.training import modeling

CHUNK_ELEMENTS = 2**26
"""Logits computed at once (rows x vocabulary): 256 MiB in fp32, whatever the batch size."""

ALIGN = 128
"""On a GPU, chunk rows and the vocabulary are padded to multiples of this. cuBLAS's fast tensor-core
kernels need aligned shapes: with GPT-2's 50,257-token vocabulary and 667-row chunks, an H200 ran the
head's three matmuls on a fallback kernel about 7x slower than the aligned ones (bench/gpu_mfu.py
--profile), which cost GPT-2-124M a third of its step time."""

_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields of architectures whose head post-processes the logits (Gemma 2, Cohere, Granite, ...)."""

_compiled_chunk: Any = None
"""`_chunk_loss_and_grad_fusible` under torch.compile, once `compile_chunks(True)` asked for it."""


def compile_chunks(enabled: bool) -> None:
    """Run each chunk's softmax and gradient as compiled (fused) kernels: `training.compile: true` asks for it.

    Eager, a chunk's logits pass through memory about eight times (cast, log-sum-exp, subtract, exp,
    scatter, cast); compiled, twice (one reduction, one pointwise kernel). Process-wide: a trainer
    process runs one training.
    """
    global _compiled_chunk
    _compiled_chunk = torch.compile(_chunk_loss_and_grad_fusible, dynamic=True) if enabled else None


def fused_head(model: Any) -> torch.nn.Linear | None:
    """The output projection when the fused loss computes exactly what the model's head would; else None."""
    base = modeling.base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or config is None:
        return None
    if any(getattr(config, name, None) not in (None, 0, 0.0, 1, 1.0) for name in _HEAD_EXTRAS):
        return None
    return head


@contextlib.contextmanager
def _captured_head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, `head` sees an empty slice of its input; the full input is appended to the list."""
    captured: list[torch.Tensor] = []

    def capture(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., :0, :], *args[1:])  # (batch, 0, hidden): no logits computed

    handle = head.register_forward_pre_hook(capture)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (fp32) and d CE / d logits = softmax - one_hot (in the logits' dtype) of one chunk.

    `logits` (rows, V'): columns from `vocabulary` on are padding and count as -inf. Eager, in place
    over one fp32 copy of the chunk.
    """
    x = logits.float()  # no copy when the logits are fp32 already: then they are overwritten
    if x.shape[1] != vocabulary:
        x[:, vocabulary:] = float("-inf")
    log_z = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, targets[:, None]).squeeze(1)
    grad = x.sub_(log_z[:, None]).exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(picked[:, None], -1.0))
    return log_z - picked, grad.to(logits.dtype)


def _chunk_loss_and_grad_fusible(logits: torch.Tensor, targets: torch.Tensor, vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_chunk_loss_and_grad` written without in-place steps, so that torch.compile fuses it into one
    reduction and one pointwise kernel (the one-hot is a comparison, not a scatter)."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    x = torch.where(columns[None, :] < vocabulary, logits.float(), float("-inf"))
    log_z = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, targets[:, None]).squeeze(1)
    grad = torch.exp(x - log_z[:, None]) - (columns[None, :] == targets[:, None]).float()
    return log_z - picked, grad.to(logits.dtype)


def _alignment(device: torch.device) -> int:
    """Multiple to pad chunk rows and the vocabulary to: `ALIGN` on a GPU; on a CPU padding buys nothing."""
    return ALIGN if device.type == "cuda" else 1


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T, target_i), with the gradients computed in the forward pass.

    hidden: (N, H) final hidden states of the target positions; weight: (V, H);
    targets: (N,) token ids; token_weights: (N,) per-token loss weights (already
    normalised: the loss is their weighted sum). Matmuls run in `compute_dtype`;
    log-sum-exp and softmax in fp32, one chunk of rows at a time. The token weights
    scale the (rows, H) matmul operands, not the (rows, V) gradient of the logits.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        align = _alignment(hidden.device)
        padded = _round_up(vocabulary, align)
        chunk = max(align, CHUNK_ELEMENTS // padded // align * align)
        want_hidden, want_weight = hidden.requires_grad, weight.requires_grad
        w = weight.to(compute_dtype)
        if padded != vocabulary:
            w = F.pad(w, (0, 0, 0, padded - vocabulary))  # zero rows: their logits are masked to -inf
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros((padded, weight.shape[1]), dtype=torch.float32, device=weight.device) if want_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_loss_and_grad = _compiled_chunk or _chunk_loss_and_grad
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            t = targets[start : start + chunk]
            tw = token_weights[start : start + chunk].float()
            logits = h @ w.T  # (chunk, V'): the only vocabulary-sized tensors are this chunk's
            per_row, grad_logits = chunk_loss_and_grad(logits, t, vocabulary)
            del logits
            loss += (per_row * tw).sum()
            # d(tw * CE)/d logits = tw * (softmax - one_hot): tw scales the rows of the (rows, H) operands
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = ((grad_logits @ w).float() * tw[:, None]).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ (h.float() * tw[:, None]).to(compute_dtype)).float()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight[:vocabulary] if grad_weight is not None else None)
                                if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        grad_hidden = next(saved) * grad_output if ctx.has[0] else None
        grad_weight = (next(saved) * grad_output).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None


def _compute_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when the caller runs under autocast (mixed precision), else the weight's own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def weighted_token_loss(model: Any, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum(w * ce) / sum(w) over the batch's target tokens, via the fused loss (see the module docstring).

    Needs `batch["target_index"]`: flat indices (into batch x length) of the
    positions that predict a target, built on the host by `evaluate.collate`
    so that selecting them costs no device sync.
    """
    index = batch["target_index"]  # (N,) positions t whose next token t+1 is a target
    with _captured_head_input(head) as captured:
        model(**modeling.model_inputs(model, batch))
    hidden = captured[0]  # (B, T, H), after the final norm: exactly what the head would have projected
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, H)
    targets = batch["labels"].reshape(-1).index_select(0, index + 1)
    weights = batch["weights"].reshape(-1).index_select(0, index + 1)
    weights = weights / weights.sum().clamp(min=1e-8)
    dtype = _compute_dtype(flat.device, head.weight)
    with torch.autocast(flat.device.type, enabled=False):
        return FusedLinearCrossEntropy.apply(flat, head.weight, targets, weights, dtype)  # type: ignore[no-any-return]


def reference_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same loss from full logits (B, T, V), for architectures the fused path does not cover (and tests)."""
    targets = labels[:, 1:]
    mask = targets != -100
    losses = F.cross_entropy(logits[:, :-1, :].transpose(1, 2), targets.clamp(min=0), reduction="none")
    w = weights[:, 1:] * mask
    return (losses * w).sum() / w.sum().clamp(min=1e-8)
