"""Peak memory of reading a dataset: kubetune's streamed reader vs reading the file whole.

One JSON Lines file of `--records` records, each with the `text` field the
dataset uses and a `--metadata-bytes` column it does not (exports carry ids,
sources, scores...). Each side runs in a fresh subprocess that reads the file
into training examples and reports its own peak resident memory (VmHWM):

(a) baseline, read whole: `data.prepare` with the file's bytes read at once,
    decoded, split into lines and each line parsed before any example is made
    (what `trainer/prep/data.py` did before it streamed, and what a reader built on
    `Path.read_text()` does);
(b) kubetune: `data.prepare` as it is (streamed a line at a time, only the
    examples kept). Cleaning and splitting are the same code on both sides.

Sides alternate for `--rounds` rounds so background load hits both alike;
prints min/median/max peak RSS and wall time per side and the ratio of the
medians (baseline / kubetune).

    python bench/data_read_memory.py [--records 20000] [--metadata-bytes 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys
from kubetune.api import config as cfg
from kubetune.trainer.prep import data
path, side = sys.argv[1], sys.argv[2]
dataset = cfg.config_from_dict({"model": {"source": "/m"}, "output": {"dir": "/o"},
                                "dataset": {"format": "text", "train": {"source": path}}}).dataset
if side == "whole":  # the same preparation, with the file read the old way
    def read_whole(source, fields, columns=None, field=None):
        text = open(source.source, "rb").read().decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data.iter_records = read_whole
prepared = data.prepare(dataset)
count = len(prepared.splits.train) + len(prepared.splits.validation) + len(prepared.splits.test)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"examples": count, "peakKiB": peak}))
"""


def write_dataset(path: Path, records: int, metadata_bytes: int) -> None:
    with path.open("w") as handle:
        for i in range(records):
            handle.write(json.dumps({"text": f"example {i} about the operator", "metadata": "m" * metadata_bytes})
                         + "\n")


def run_side(path: Path, side: str) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, examples) of one fresh process reading the file."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), side], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peakKiB"] / 1024, seconds, int(result["examples"])


def spread(values: list[float]) -> str:
    return f"min {min(values):.1f} / median {statistics.median(values):.1f} / max {max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--metadata-bytes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small file, 1 round: a smoke test, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.records, args.metadata_bytes, args.rounds = 2000, 2000, 1
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "data.jsonl"
        write_dataset(path, args.records, args.metadata_bytes)
        size_mib = path.stat().st_size / 2**20
        print(f"file: {size_mib:.1f} MiB, {args.records} records, {args.metadata_bytes}-byte unused column")
        figures: dict[str, dict[str, list[float]]] = {s: {"rss": [], "seconds": []} for s in ("whole", "kubetune")}
        examples = {}
        for round_index in range(args.rounds):
            for side in ("whole", "kubetune") if round_index % 2 == 0 else ("kubetune", "whole"):
                rss, seconds, examples[side] = run_side(path, side)
                figures[side]["rss"].append(rss)
                figures[side]["seconds"].append(seconds)
        assert examples["whole"] == examples["kubetune"] == args.records, examples
    for side, label in (("whole", "baseline, read whole"), ("kubetune", "kubetune, streamed")):
        print(f"{label:22s} peak RSS MiB {spread(figures[side]['rss'])}; seconds {spread(figures[side]['seconds'])}")
    ratio = statistics.median(figures["whole"]["rss"]) / statistics.median(figures["kubetune"]["rss"])
    print(f"peak RSS ratio (baseline / kubetune, medians): {ratio:.2f}x")
    result = {"fileMiB": round(size_mib, 1), "rounds": args.rounds, "ratio": round(ratio, 2),
              **{f"{side}PeakRssMiB": figures[side]["rss"] for side in figures},
              **{f"{side}Seconds": [round(s, 2) for s in figures[side]["seconds"]] for side in figures}}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
