"""One-line views of a FineTuneJob's status for terminals (``kubetune dev``, ``kubetune status``)."""

from __future__ import annotations

from typing import Any

BAR_WIDTH = 28


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    """The condition of type ``kind`` (empty dict when absent)."""
    for item in status.get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return {}


def is_true(status: dict[str, Any], kind: str) -> bool:
    return condition(status, kind).get("status") == "True"


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def progress_line(status: dict[str, Any]) -> str:
    """``[#####.....]  42% step 21/50 epoch 1.3 loss 2.31 val 2.40 ETA 00:31  Running``."""
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    step, total = progress.get("step") or 0, progress.get("totalSteps") or 0
    percent = progress.get("percent")
    if percent is None and total:
        percent = 100.0 * step / total
    percent = float(percent or 0.0)
    filled = int(BAR_WIDTH * min(percent, 100.0) / 100.0)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    phase = status.get("phase") or "Pending"
    parts = [f"[{bar}] {percent:5.1f}%", f"step {step}/{total or '?'}"]
    if progress.get("epoch") is not None:
        parts.append(f"epoch {float(progress['epoch']):.2f}")
    parts.append(f"loss {_number(metrics.get('trainLoss'))}")
    parts.append(f"val {_number(metrics.get('valLoss'))}")
    if progress.get("tokensPerSecond"):
        parts.append(f"{float(progress['tokensPerSecond']):.0f} tok/s")
    parts.append(f"ETA {format_seconds(progress.get('etaSeconds'))}")
    parts.append(phase)
    return "  ".join(parts)


def summary(job: dict[str, Any]) -> str:
    """A multi-line description of a job: conditions, metrics, results, model, endpoint."""
    status = job.get("status") or {}
    meta = job.get("metadata") or {}
    lines = [f"{meta.get('namespace')}/{meta.get('name')}: {status.get('phase') or 'Pending'}",
             "  " + progress_line(status)]
    for item in status.get("conditions") or []:
        lines.append(f"  {item.get('type'):<13} {item.get('status'):<6} {item.get('reason', '')}: {item.get('message', '')}")
    results = status.get("results") or {}
    if isinstance(results.get("baseline"), dict):
        lines.append("  results on the test split:")
        lines += ["    " + row for row in comparison_rows(results)]
    elif results:
        shown = ", ".join(f"{k}={_number(v)}" for k, v in results.items() if isinstance(v, (int, float)))
        lines.append(f"  results: {shown}")
    model = status.get("model") or {}
    if model:
        lines.append(f"  model: {model.get('uri')} ({model.get('digest', '')[:19]})")
    if status.get("endpoint"):
        lines.append(f"  endpoint: {status['endpoint']}")
    return "\n".join(lines)


COMPARED = ("loss", "perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1")
"""Test metrics shown side by side for the base and the fine-tuned model, in this order."""
_CHANGE = {"perplexity": "perplexityDrop", "loss": "lossDrop", "tokenAccuracy": "tokenAccuracyGain",
           "accuracy": "accuracyGain", "f1": "f1Gain"}


def _change(metric: str, improvement: dict[str, Any]) -> str:
    value = improvement.get(_CHANGE.get(metric, ""))
    if not isinstance(value, (int, float)):
        return ""
    if metric == "perplexity":
        return f"{abs(value) * 100:.1f}% {'lower' if value >= 0 else 'higher'}"
    if metric == "loss":
        return f"{-value:+.4f}"
    return f"{value:+.1f} points"


def comparison_rows(results: dict[str, Any]) -> list[str]:
    """The base vs fine-tuned table: a header and one row per test metric both models have."""
    baseline = results.get("baseline") or {}
    improvement = results.get("improvement") or {}
    rows = [f"{'metric':<14} {'base model':>12} {'fine-tuned':>12}  change"]
    for metric in COMPARED:
        tuned = results.get(metric)
        if not isinstance(tuned, (int, float)):
            continue
        rows.append(f"{metric:<14} {_number(baseline.get(metric)):>12} {_number(tuned):>12}  "
                    f"{_change(metric, improvement)}".rstrip())
    return rows


EMPTY_ANSWER = "(nothing: the model ended its answer at once)"


def samples_view(status: dict[str, Any]) -> str:
    """The sample answers of `status.samples`: each prompt with the base, fine-tuned and reference answers."""
    samples = status.get("samples") or []
    if not samples:
        return ("no sample answers in status (set spec.evaluation.samples; they are also in samples.json "
                "in the job's output folder)")
    blocks = []
    for number, sample in enumerate(samples, start=1):
        lines = [f"[{number}] prompt: {sample.get('prompt', '')}"]
        for key, label in (("base", "base model"), ("tuned", "fine-tuned"), ("reference", "reference")):
            if key in sample:
                lines.append(f"    {label + ':':<12} {sample[key] or EMPTY_ANSWER}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
