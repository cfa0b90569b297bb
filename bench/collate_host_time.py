"""Host time to build one training micro-batch: `evaluate.collate` against the plain element-by-element build.

The GPU waits while the host builds a batch whenever nothing else is queued, so
the host time per micro-batch adds to every step that is not overlapped. The
batch is GPT-2-124M's MFU batch in bench/gpu_mfu.py: 16 packed rows of 1024
tokens (examples of 10-120 tokens, as instruction data). Both sides build CPU
tensors only (the device copy is the same for both, and pinned on a GPU).

Sides, each in its own process, alternating A B B A ..., `--rounds` rounds:
- plain: Python lists padded and flattened element by element, `torch.tensor` per field (the trainer's
  collate before 2026-12-04);
- kubetune: `kubetune.trainer.evaluation.evaluate.collate` (numpy fills, one nonzero for the targets).
Each process times `--batches` builds after 5 warm-up builds and prints the median milliseconds.

    python bench/collate_host_time.py [--rounds 3] [--batches 50]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

ROWS, WIDTH = 16, 1024


def sequences() -> list[Any]:
    from kubetune.trainer.prep.data import IGNORE_INDEX, PackedSequence

    generator = random.Random(0)
    rows = []
    for _ in range(ROWS):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        examples = 0
        while len(ids) < WIDTH - 10:
            length = min(generator.randint(10, 120), WIDTH - len(ids))
            example = [generator.randint(0, 50_000) for _ in range(length)]
            ids += example
            labels += [IGNORE_INDEX, *example[1:]]
            positions += list(range(length))
            examples += 1
        rows.append(PackedSequence(ids, labels, positions, [1.0] * len(ids), examples))
    return rows


def plain_collate(batch: list[Any], pad_id: int) -> dict[str, Any]:
    import torch

    from kubetune.trainer.prep.data import IGNORE_INDEX

    width = max(len(s.input_ids) for s in batch)
    ids, labels, positions, weights, target_index = [], [], [], [], []
    for row, s in enumerate(batch):
        pad = width - len(s.input_ids)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE_INDEX] * pad)
        positions.append(s.position_ids + list(range(pad)))
        weights.append(s.weights + [0.0] * pad)
        target_index += [row * width + t - 1 for t in range(1, len(s.labels)) if s.labels[t] != IGNORE_INDEX]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
            "weights": torch.tensor(weights, dtype=torch.float32), "target_index": torch.tensor(target_index)}


def run_side(side: str, batches: int) -> float:
    import torch

    from kubetune.trainer.evaluation import evaluate

    rows = sequences()
    cpu = torch.device("cpu")
    build = (lambda: evaluate.collate(rows, 0, cpu)) if side == "kubetune" else (lambda: plain_collate(rows, 0))
    for _ in range(5):
        build()
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        build()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(f"SIDE {run_side(args.side, args.batches)}")
        return 0
    results: dict[str, list[float]] = {"plain": [], "kubetune": []}
    for round_index in range(args.rounds):
        for side in ("plain", "kubetune") if round_index % 2 == 0 else ("kubetune", "plain"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--batches", str(args.batches)],
                                 capture_output=True, text=True, check=True).stdout
            results[side].append(float(out.split("SIDE ")[-1]))
    for side, values in results.items():
        print(f"{side:<9} ms per {ROWS} x {WIDTH} batch, min / median / max over {args.rounds} processes: "
              f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}")
    ratio = statistics.median(results["plain"]) / statistics.median(results["kubetune"])
    load = os.getloadavg()[0]
    print(f"kubetune builds a batch {ratio:.1f}x faster than the plain build (medians; load average {load:.1f})")
    print("RESULT " + json.dumps({"bench": "collate_host_time", "rows": ROWS, "width": WIDTH, "msPerBatch": results,
                                  "speedup": round(ratio, 2), "loadAverage": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
