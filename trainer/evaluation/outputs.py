"""What a finished run leaves in `output.dir`: model or adapter, metrics.json, model card, loss curve.

Where each lives is defined once, in `kubetune.api.layout`, which the operator uses too:

    model/            save_pretrained folder (safetensors + tokenizer); with LoRA + merge, the merged model
    adapter/          peft adapter + tokenizer, when LoRA adapters are saved separately (merge: false)
    metrics.json      final metrics, resolved hyperparameters, data statistics, digest
    baseline.json     the base model's test results and sample answers, measured before training
    samples.json      sample test prompts with the base and the fine-tuned model's answers
    README.md         model card
    loss_curve.png    training and validation loss by step
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kubetune.api import layout
from kubetune.api.config import TrainerConfig, config_to_dict


def model_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in path order: equal folders, equal digests."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def save_model(model: Any, tokenizer: Any, config: TrainerConfig, base_model_path: str) -> Path:
    """Save the trained model (merged) or the adapter, with the tokenizer; return the folder."""
    folder = Path(layout.model_location(config.output.dir, config.method.type, config.method.lora_settings().merge))
    if layout.saves_adapter(config.method.type, config.method.lora_settings().merge):
        model.peft_config["default"].base_model_name_or_path = base_model_path
        model.save_pretrained(folder, safe_serialization=True)
    else:
        if config.method.type == "lora":
            model = model.merge_and_unload()
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def plot_loss_curve(train_losses: list[list[float]], evaluations: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step (and its moving average) with validation loss markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train_losses:
        steps, losses = zip(*train_losses, strict=True)
        axes.plot(steps, losses, color="#9bb7d4", linewidth=1, label="train loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            axes.plot(steps, smooth, color="#1f5f9f", linewidth=2, label=f"train loss ({window}-step mean)")
    validation = [(e["step"], e["valLoss"]) for e in evaluations if "valLoss" in e]
    if validation:
        steps, losses = zip(*validation, strict=True)
        axes.plot(steps, losses, "o-", color="#d9534f", linewidth=2, label="validation loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title("Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def lineage_lines(config: TrainerConfig) -> list[str]:
    """The model card's lineage: base model -> job -> job, when the run trained on from an earlier job."""
    if not config.job.lineage:
        return []
    chain = [f"`{entry.uri}`" if not entry.job else f"{entry.job} (`{entry.uri}`"
             + (f", {entry.digest}" if entry.digest else "") + ")" for entry in config.job.lineage]
    chain.append(config.job.name or Path(config.output.dir).name)
    return ["## Lineage", "", "Trained on from an earlier job's model (spec.model.fromJob), oldest first:", "",
            " → ".join(chain), ""]


def model_card(config: TrainerConfig, metrics: dict[str, Any]) -> str:
    """A short README.md: what was trained on what, how, and how well."""
    hp = metrics["hyperparameters"]
    lines = [
        f"# {config.job.name or Path(config.output.dir).name}",
        "",
        f"Fine-tuned from `{config.model.source}` with kubetune ({config.method.type}"
        + (f", rank {config.method.lora_settings().rank}, alpha {config.method.lora_settings().alpha}" if config.method.type == "lora" else "")
        + ").",
        "",
        *lineage_lines(config),
        "## Data",
        "",
        f"- format: `{config.dataset.format}`, train source: `{config.dataset.train.source}`",
        f"- examples: {metrics['data']['splits']}",
        f"- tokens seen in training: {metrics['tokensSeen']}",
        "",
        "## Training",
        "",
        "| hyperparameter | value | |",
        "| --- | --- | --- |",
    ]
    for key, value in hp.items():
        if key != "automatic":
            lines.append(f"| {key} | {_format(value)} | {'auto' if key in hp['automatic'] else ''} |")
    lines += [
        "",
        f"Steps: {metrics['step']} of {metrics['totalSteps']}"
        + (" (stopped early)" if metrics.get("stoppedEarly") else "")
        + f"; wall time {metrics['wallSeconds']:.0f} s on {metrics['device']}.",
        "",
        "## Results",
        "",
        f"- validation loss: {_format(metrics.get('initialValLoss'))} before, {_format(metrics.get('valLoss'))} after",
    ]
    results = metrics.get("results") or {}
    if isinstance(results.get("baseline"), dict):
        lines += ["", *comparison_table(results)]
    else:
        for key, value in results.items():
            if isinstance(value, (int, float)):
                lines.append(f"- test {key}: {_format(value)}")
    lines += ["", "![loss curve](loss_curve.png)", ""]
    if metrics.get("samples"):
        lines += ["## Sample answers", "", "Greedy answers to test prompts, before and after fine-tuning.", ""]
        for sample in metrics["samples"]:
            lines += [f"**Prompt:** {sample['prompt']}", ""]
            if "base" in sample:
                lines += [f"- base model: {sample['base']}"]
            lines += [f"- fine-tuned: {sample['tuned']}", f"- reference: {sample['reference']}", ""]
    return "\n".join(lines)


COMPARED_METRICS = ("loss", "perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1")
"""Test metrics the model card and `kubetune status` put side by side, in this order."""


def comparison_table(results: dict[str, Any]) -> list[str]:
    """Markdown table: each test metric for the base model and the fine-tuned one, and the change."""
    baseline = results.get("baseline") or {}
    change = results.get("improvement") or {}
    notes = {"perplexity": ("perplexityDrop", lambda v: f"{v * 100:.1f}% lower" if v >= 0 else f"{-v * 100:.1f}% higher"),
             "loss": ("lossDrop", lambda v: f"{-v:+.4g}"),
             "tokenAccuracy": ("tokenAccuracyGain", lambda v: f"{v:+.1f} points"),
             "accuracy": ("accuracyGain", lambda v: f"{v:+.1f} points"),
             "f1": ("f1Gain", lambda v: f"{v:+.1f} points")}
    lines = ["| test metric | base model | fine-tuned | change |", "| --- | --- | --- | --- |"]
    for key in COMPARED_METRICS:
        if not isinstance(results.get(key), (int, float)):
            continue
        name, describe = notes.get(key, ("", str))
        delta = change.get(name)
        lines.append(f"| {key} | {_format(baseline.get(key, '-'))} | {_format(results[key])} | "
                     f"{describe(delta) if isinstance(delta, (int, float)) else ''} |")
    return lines


def write_outputs(config: TrainerConfig, metrics: dict[str, Any], train_losses: list[list[float]], evaluations: list[dict[str, Any]]) -> None:
    output = Path(config.output.dir)
    metrics = metrics | {"config": config_to_dict(config)}
    write_json(output / layout.METRICS_FILE, metrics)
    if metrics.get("samples"):
        write_json(output / "samples.json", {"samples": metrics["samples"]})
    (output / "README.md").write_text(model_card(config, metrics), encoding="utf-8")
    plot_loss_curve(train_losses, evaluations, output / "loss_curve.png")
