"""Time of a namespace quota pass over many FineTuneJobs: every spec parsed vs parsed once per version.

With a quota that counts running jobs, every reconcile of a job reads the usage of every job in its
namespace (`quota.namespace_usage`), which needs each job's typed spec. Each side runs in a fresh
subprocess over `--jobs` FineTuneJob bodies as the API server returns them:

(a) baseline, every parse: the bodies carry no resourceVersion, so `specs.spec_of` parses each spec on
    each pass (what reconcile did before the per-version cache);
(b) kubetune: bodies with a uid and a resourceVersion; one pass warms the cache, the timed passes
    find each version parsed already (the state of a busy namespace, where few jobs change between
    two reconciles).

Each side times `--passes` passes and reports the median pass. Sides alternate for `--rounds` rounds
so background load hits both alike; prints min/median/max per side and the ratio of the medians.

    python bench/quota_spec_parse.py [--jobs 1000] [--passes 5] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import copy, json, statistics, sys, time
from kubetune.operator.platform import quota
jobs, passes, side = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
spec = {"model": {"source": "pvc://models/base"}, "dataset": {"format": "chat", "train": {"source": "pvc://data/t.jsonl"}},
        "output": {"storage": "pvc://models/out"}, "resources": {"gpus": 1}, "serving": {"enabled": True}}
bodies = []
for i in range(jobs):
    metadata = {"name": f"job-{i}", "namespace": "team-a", "uid": f"uid-{i}", "creationTimestamp": "2026-12-03T00:00:00Z"}
    if side == "cached":
        metadata["resourceVersion"] = str(1000 + i)
    bodies.append({"metadata": metadata, "spec": copy.deepcopy(spec), "status": {}})
bodies = tuple(bodies)
usage = quota.namespace_usage(bodies, ())  # warms the cache on the cached side; the same work otherwise
times = []
for _ in range(passes):
    start = time.perf_counter()
    usage = quota.namespace_usage(bodies, ())
    times.append(time.perf_counter() - start)
print(json.dumps({"passMs": 1000 * statistics.median(times), "jobsCounted": len(usage)}))
"""

SIDES = ("every parse", "cached")


def run_side(side: str, jobs: int, passes: int) -> dict[str, float]:
    arg = "cached" if side == "cached" else "uncached"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(jobs), str(passes), arg], capture_output=True,
                          text=True, check=True)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):8.1f} / {statistics.median(values):8.1f} / {max(values):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 jobs, 2 passes, 3 rounds (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.passes, args.rounds = 100, 2, 3
    timings: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in (SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))):
            outcome = run_side(side, args.jobs, args.passes)
            assert outcome["jobsCounted"] == args.jobs, outcome
            timings[side].append(outcome["passMs"])
    print(f"quota pass over {args.jobs} FineTuneJobs, median of {args.passes} passes, {args.rounds} alternating rounds")
    print(f"{'side':14s} {'min / median / max (ms per pass)':>34s}")
    for side in SIDES:
        print(f"{side:14s} {spread(timings[side])}")
    ratio = statistics.median(timings["every parse"]) / statistics.median(timings["cached"])
    print(f"every parse / cached (medians) = {ratio:.1f}x")
    print("RESULT " + json.dumps({"jobs": args.jobs, "passes": args.passes, "rounds": args.rounds,
                                  "sides": {side: {"passMs": timings[side],
                                                   "medianPassMs": statistics.median(timings[side])}
                                            for side in SIDES},
                                  "ratio": ratio}))


if __name__ == "__main__":
    main()
