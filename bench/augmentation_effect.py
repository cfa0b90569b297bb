"""Augmentation effect: validation loss of the same small run with and without edit augmentation.

A small classification task (40 training examples; separate 40-example
validation and test files from the same distribution) trains the tiny GPT-2
model from `kubetune.dev.tinymodel` through the real trainer program
(`python -m kubetune.trainer` in-process), twice per seed:

- baseline: no augmentation, `epochs = (1 + multiplier) × E`;
- augmented: `dataset.augmentation` edits with `multiplier` copies, `epochs = E`,

so both see the same number of training sequences (the same steps budget;
packing makes the counts equal within a step or two, printed). Validation loss
is the trainer's own `valLoss` of the model it keeps (the best evaluation with
`keepBest`), computed on the label tokens; test accuracy comes from the
trainer's label-likelihood evaluation. Each figure is the mean over `--seeds`.

    python bench/augmentation_effect.py              # ~2 minutes on 2 CPU cores
    python bench/augmentation_effect.py --seeds 1    # quicker, noisier
    python bench/augmentation_effect.py --quick      # smoke test: 1 seed, 1 epoch, multiplier 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

POSITIVE = ["great", "fast", "stable", "clean", "quick", "smooth", "solid", "happy"]
NEGATIVE = ["slow", "broken", "flaky", "stuck", "failing", "noisy", "messy", "sad"]
FILLER = ["the", "job", "pod", "node", "run", "today", "again", "really", "was", "and", "after", "update",
          "cluster", "queue", "model", "checkpoint", "seemed", "quite", "overall", "this", "week"]


def records(count: int, seed: int) -> list[dict[str, Any]]:
    """Short reviews: one or two sentiment words decide the label, hidden among filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(FILLER, rng.randint(5, 9))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_once(model: Path, data: dict[str, str], out: Path, *, epochs: int, seed: int,
             augmentation: dict[str, Any] | None) -> dict[str, Any]:
    from kubetune.trainer import __main__ as program

    dataset: dict[str, Any] = {"format": "classification", "train": {"source": data["train"]},
                               "validation": {"source": data["validation"]}, "test": {"source": data["test"]}}
    if augmentation:
        dataset["augmentation"] = augmentation
    config = {
        "model": {"source": str(model)},
        "dataset": dataset,
        "method": {"type": "full"},
        "hyperparameters": {"epochs": epochs, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 3e-3,
                            "seed": seed, "maxSeqLength": 64},
        "training": {"evalInterval": 10, "checkpointInterval": 1000, "keepBest": True},
        "output": {"dir": str(out)},
    }
    path = out.with_suffix(".json")
    path.write_text(json.dumps(config))
    with contextlib.redirect_stdout(io.StringIO()):  # progress reports are JSON lines on stdout
        code = program.main(["--config", str(path)])
    if code != 0:
        raise SystemExit(f"trainer exited {code} for {path}")
    metrics = json.loads((out / "metrics.json").read_text())
    evaluations = metrics["history"]["evaluations"]
    return {"valLoss": metrics["valLoss"], "finalValLoss": evaluations[-1]["valLoss"], "steps": metrics["step"], "accuracy": metrics["results"].get("accuracy"),
            "train": metrics["data"]["splits"]["train"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds to average over")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the augmented run (E)")
    parser.add_argument("--multiplier", type=int, default=3, help="augmented copies per real example")
    parser.add_argument("--rate", type=float, default=0.15, help="fraction of words edited per copy")
    parser.add_argument("--operations", default="wordDeletion,wordSwap,wordInsertion,charNoise",
                        help="comma-separated edit operations")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 1 epoch, multiplier 1")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.multiplier = 1, 1, 1

    import logging

    import transformers

    from kubetune.dev import tinymodel

    logging.disable(logging.INFO)
    transformers.logging.set_verbosity_error()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        corpus = [r["text"] for r in records(400, seed=99)] + tinymodel.default_corpus(200)
        model = tinymodel.create_tiny_model(root / "model", corpus=corpus)
        data = {name: write_jsonl(root / f"{name}.jsonl", records(40, seed=index))
                for index, name in enumerate(("train", "validation", "test"))}
        augmentation = {"enabled": True, "multiplier": args.multiplier, "rate": args.rate, "seed": 1,
                        "operations": args.operations.split(",")}
        results: dict[str, list[dict[str, Any]]] = {"baseline": [], "augmented": []}
        for seed in range(args.seeds):
            results["baseline"].append(run_once(model, data, root / f"base-{seed}", seed=seed, augmentation=None,
                                                epochs=args.epochs * (1 + args.multiplier)))
            results["augmented"].append(run_once(model, data, root / f"aug-{seed}", seed=seed,
                                                 augmentation=augmentation, epochs=args.epochs))
    print(f"classification, 40 train / 40 validation / 40 test examples, tiny GPT-2, {args.seeds} seed(s); "
          f"augmentation: {args.operations}, multiplier {args.multiplier}, rate {args.rate}")
    print(f"{'run':<10} {'train ex':>8} {'steps':>6} {'best val loss (per seed)':<26} {'mean':>7} "
          f"{'final val loss':>14} {'test acc':>8}")
    means, finals = {}, {}
    for name, runs in results.items():
        losses = [r["valLoss"] for r in runs]
        means[name] = statistics.mean(losses)
        finals[name] = statistics.mean(r["finalValLoss"] for r in runs)
        accuracy = statistics.mean(r["accuracy"] for r in runs)
        print(f"{name:<10} {runs[0]['train']:>8} {runs[0]['steps']:>6} {' '.join(f'{x:.4f}' for x in losses):<26} "
              f"{means[name]:>7.4f} {finals[name]:>14.4f} {accuracy:>8.3f}")
    print(f"val loss ratio augmented / baseline: best {means['augmented'] / means['baseline']:.3f}, "
          f"final {finals['augmented'] / finals['baseline']:.3f} ({time.monotonic() - started:.0f} s)")
    print("RESULT " + json.dumps({"seeds": args.seeds, "meanBestValLoss": means, "meanFinalValLoss": finals,
                                  "trainExamples": {name: runs[0]["train"] for name, runs in results.items()},
                                  "bestRatio": means["augmented"] / means["baseline"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
