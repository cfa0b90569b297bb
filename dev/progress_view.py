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
    if results:
        shown = ", ".join(f"{k}={_number(v)}" for k, v in results.items() if isinstance(v, (int, float)))
        lines.append(f"  results: {shown}")
    model = status.get("model") or {}
    if model:
        lines.append(f"  model: {model.get('uri')} ({model.get('digest', '')[:19]})")
    if status.get("endpoint"):
        lines.append(f"  endpoint: {status['endpoint']}")
    return "\n".join(lines)
