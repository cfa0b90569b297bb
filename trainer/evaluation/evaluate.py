"""Evaluation: loss, perplexity and token accuracy on packed sequences; classification by label likelihood.

Classification is scored the way the model was trained: for every test text,
each label's completion (" label" + EOS) is scored by its summed token
log-likelihood after the classification prompt, and the most likely label is
the prediction. No generation, no parsing of free text, and labels that share
a prefix ("pos" / "positive") are still told apart because EOS is scored too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from kubetune.trainer.prep import data
from kubetune.trainer.prep.data import IGNORE_INDEX, PackedSequence
from kubetune.trainer.training import loss, modeling


def collate(
    sequences: Sequence[PackedSequence], pad_id: int, device: torch.device, *, flatten: bool = False
) -> dict[str, Any]:
    """Right-pad a batch. Pads sit after every real token, so causal attention never sees them.

    `flatten` puts the whole batch into one row instead (no padding at all) for
    flash-attention's variable-length kernel, which takes packed examples only
    in a batch of one: `attention_kwargs` then carries the examples' cumulative
    lengths, so the kernel needs no device sync to find them. Every batch also
    carries `target_index`, the flat (row x length) indices of the positions
    whose next token is a target, built here on the host (see `loss.py`).

    Built with numpy on the host, then copied to the device. On a GPU the copies
    come from pinned memory without blocking: a plain `torch.tensor(..., device=cuda)`
    waits for every kernel already queued, so each batch would stall the GPU while
    the host prepares the next one.
    """
    if flatten:
        sequences = [
            PackedSequence(
                [t for s in sequences for t in s.input_ids], [t for s in sequences for t in s.labels],
                [p for s in sequences for p in s.position_ids], [w for s in sequences for w in s.weights],
                sum(s.num_examples for s in sequences),
            )
        ]
    rows, width = len(sequences), max(len(s.input_ids) for s in sequences)
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((rows, width), dtype=np.int64)
    weights = np.zeros((rows, width), dtype=np.float32)
    for row, s in enumerate(sequences):
        length = len(s.input_ids)
        ids[row, :length] = s.input_ids
        labels[row, :length] = s.labels
        positions[row, :length] = s.position_ids
        positions[row, length:] = np.arange(width - length)  # the padding restarts at 0, as one more "example"
        weights[row, :length] = s.weights
    target_rows, target_columns = np.nonzero(labels[:, 1:] != IGNORE_INDEX)  # row-major: t - 1 predicts t
    host = {"input_ids": ids, "labels": labels, "position_ids": positions, "weights": weights,
            "target_index": target_rows * width + target_columns}
    batch: dict[str, Any] = {name: _to_device(array, device) for name, array in host.items()}
    # Known here, on the host: does any row hold more than one example (or padding)? `modeling.model_inputs`
    # then needs no device read to choose the attention mask.
    batch["packed"] = bool(np.any(positions[:, 0] != 0) or np.any(np.diff(positions, axis=1) != 1))
    if flatten:
        starts = np.flatnonzero(positions[0] == 0).tolist() + [width]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        cumulative = np.array([0, *itertools.accumulate(lengths)], dtype=np.int32)
        batch["attention_kwargs"] = {"cu_seq_lens_q": _to_device(cumulative, device),
                                     "cu_seq_lens_k": _to_device(cumulative, device),
                                     "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return batch


def _to_device(array: np.ndarray[Any, Any], device: torch.device) -> torch.Tensor:
    """A host array on `device`; to a GPU from pinned memory, without waiting for the queued kernels."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def flat_batches(model: Any) -> bool:
    """Whether batches for `model` must be flattened into one row (flash-attention with packed examples)."""
    return modeling.attention_implementation_of(model).startswith("flash_attention")


def token_losses(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-target cross-entropy, target mask and predictions, each (batch, seq-1)."""
    # Packed rows attend within each example only (modeling.model_inputs: the mask or the positions).
    logits = model(**modeling.model_inputs(model, batch)).logits
    logits = logits[:, :-1, :].float()  # (B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (B, T-1)
    return losses * mask, mask, logits.argmax(dim=-1)


def training_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean token loss, sum(w * ce) / sum(w) as in weighted cross-entropy; and the target count.

    Both stay on the device (no host sync per micro-batch). Uses the fused
    linear cross-entropy (`loss.py`: no vocabulary-sized logits) where the
    architecture allows, the plain logits path otherwise.
    """
    head = loss.fused_head(model)
    if head is not None:
        index = batch["target_index"]  # a fill on the device: new_tensor(int) would copy from the host and wait
        return loss.weighted_token_loss(model, head, batch), torch.full((), index.numel(), dtype=index.dtype,
                                                                        device=index.device)
    losses, mask, _ = token_losses(model, batch)
    weights = batch["weights"][:, 1:] * mask
    return (losses * weights).sum() / weights.sum().clamp(min=1e-8), mask.sum()


@torch.no_grad()
def language_model_metrics(
    model: Any,
    sequences: Sequence[PackedSequence],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """Token-weighted loss, perplexity = exp(loss), and next-token accuracy over the targets.

    `reduce` sums the totals across processes when the sequences are sharded.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, targets, correct
    try:
        for start in range(0, len(sequences), batch_size):
            if should_stop():
                break
            batch = collate(sequences[start : start + batch_size], pad_id, device, flatten=flat_batches(model))
            losses, mask, predictions = token_losses(model, batch)
            correct = ((predictions == batch["labels"][:, 1:]) & mask).sum()
            totals += torch.stack([losses.sum().double(), mask.sum().double(), correct.double()])
    finally:
        model.train(was_training)
    loss_sum, count, correct = reduce(totals).tolist()
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokenAccuracy": correct / count}


@torch.no_grad()
def label_log_likelihoods(model: Any, tokenizer: Any, text: str, labels: Sequence[str], device: torch.device) -> list[float]:
    """Summed log-probability of each label's completion (with EOS) after the classification prompt."""
    example_tokens = [
        data.tokenize_example(
            data.Example(prompt=text, completion=data.classification_completion(label), label=label),
            tokenizer,
            append_eos=True,
        )
        for label in labels
    ]
    sequences = [data.as_sequence([tokens]) for tokens in example_tokens]
    batch = collate(sequences, tokenizer.pad_token_id or 0, device)
    losses, mask, _ = token_losses(model, batch)
    return [-float(row.sum()) for row in losses]


def predict_labels(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str], device: torch.device) -> list[str]:
    was_training = model.training
    model.eval()
    try:
        predictions = []
        for text in texts:
            scores = label_log_likelihoods(model, tokenizer, text, labels, device)
            predictions.append(labels[max(range(len(labels)), key=scores.__getitem__)])
        return predictions
    finally:
        model.train(was_training)


def classification_metrics(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy; precision, recall and F1 per class and macro-averaged; confusion matrix [true][predicted].

    A class never predicted has precision 0; a class absent from `truth` has recall 0
    (the scikit-learn `zero_division=0` convention).
    """
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t]][index[p]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        true_positive = matrix[i][i]
        predicted_count = sum(row[i] for row in matrix)
        actual_count = sum(matrix[i])
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / actual_count if actual_count else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_count}
    count = len(labels)
    return {
        "accuracy": sum(matrix[i][i] for i in range(count)) / max(1, len(truth)),
        "precision": sum(c["precision"] for c in per_class.values()) / count,
        "recall": sum(c["recall"] for c in per_class.values()) / count,
        "f1": sum(c["f1"] for c in per_class.values()) / count,
        "perClass": per_class,
        "confusionMatrix": {"labels": list(labels), "matrix": matrix},
    }


def improvement(baseline: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """How much better the tuned model did than the base model on the same test split.

    `perplexityDrop` is relative, (base - tuned) / base: 0.3 means a 30% lower perplexity, 0 no
    change, negative worse. `lossDrop` is in nats per token. Accuracies and F1 gain in percentage
    points (tuned - base) * 100, so 0 says "it did not help" for every figure.
    """
    found: dict[str, float] = {}

    def number(results: dict[str, Any], key: str) -> float | None:
        value = results.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None

    base_ppl, tuned_ppl = number(baseline, "perplexity"), number(tuned, "perplexity")
    if base_ppl and tuned_ppl is not None:
        found["perplexityDrop"] = (base_ppl - tuned_ppl) / base_ppl
    base_loss, tuned_loss = number(baseline, "loss"), number(tuned, "loss")
    if base_loss is not None and tuned_loss is not None:
        found["lossDrop"] = base_loss - tuned_loss
    for key, name in (("tokenAccuracy", "tokenAccuracyGain"), ("accuracy", "accuracyGain"), ("f1", "f1Gain")):
        before, after = number(baseline, key), number(tuned, key)
        if before is not None and after is not None:
            found[name] = (after - before) * 100.0
    return found
