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

CHUNK_ELEMENTS = 2**25
"""Logits computed at once (rows x vocabulary): 128 MiB in fp32, whatever the batch size."""

_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields of architectures whose head post-processes the logits (Gemma 2, Cohere, Granite, ...)."""


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


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T, target_i), with the gradients computed in the forward pass.

    hidden: (N, H) final hidden states of the target positions; weight: (V, H);
    targets: (N,) token ids; token_weights: (N,) per-token loss weights (already
    normalised: the loss is their weighted sum). Matmuls run in `compute_dtype`;
    log-sum-exp and softmax in fp32, one chunk of rows at a time.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        rows, vocabulary = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // vocabulary)
        want_hidden, want_weight = hidden.requires_grad, weight.requires_grad
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            t = targets[start : start + chunk]
            tw = token_weights[start : start + chunk].float()
            logits = (h @ w.T).float()  # (chunk, V): the only vocabulary-sized tensor, freed each iteration
            log_z = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            loss += ((log_z - picked) * tw).sum()
            if want_hidden or want_weight:
                # d(w * CE)/d logits = w * (softmax - one_hot), computed in place over the chunk's logits
                grad_logits = logits.sub_(log_z[:, None]).exp_()
                grad_logits.scatter_add_(1, t[:, None], -torch.ones_like(picked)[:, None])
                grad_logits.mul_(tw[:, None])
                g = grad_logits.to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = (g @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (g.T @ h).float()  # fp32 accumulation across chunks
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
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
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
              **batch.get("attention_kwargs", {}))
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
