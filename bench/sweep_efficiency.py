"""Sweep efficiency: the best validation loss grid, random and TPE+ASHA find for a budget of trial-steps.

The same small search space on the tiny GPT-2 model from `kubetune.dev.tinymodel`
(LoRA, a small text dataset): learning rate (logUniform) x LoRA rank
(categorical) x warmup ratio (uniform); grid search uses 3 points each (27
trials). Every trial is a real training run of the real trainer (`train.setup`
+ `train.fit`, in-process, validation every `--eval-interval` steps), and every
search is driven by the operator's own engine (`kubetune.operator.sweeps.reconcile` for
grid/random values, `sweep_study` for the Optuna study, pruner and sampler), one
trial at a time:

- grid: all 27 trials to the end (the baseline budget B = 27 x steps per trial);
- random: seeded random trials to the end until B/3 trial-steps are spent;
- TPE+ASHA: TPE asks, ASHA (successive halving, `minResource` = one evaluation
  interval, reduction factor 3) prunes at every validation; trials until B/3
  trial-steps are spent (a pruned trial costs only the steps it ran).

The figure of a search is the best validation loss of a trial that ran to its
end (pruned trials' partial losses, and a last trial cut short by the budget,
do not count), and the best found within
B/9, B/3 and B budget. Each (search, seed) runs in its own process, the
searches alternating within each seed; `--seeds` seeds (the training seed and
the sampler seed); min/median/max over seeds are printed, and the CPU-seconds
each search spent (process time; GPU-seconds on a GPU machine).

    python bench/sweep_efficiency.py [--parallel]  # ~20 CPU-minutes (3 seeds); --parallel runs the seeds at once
    python bench/sweep_efficiency.py --quick     # smoke test: a 2x1x2 grid of 4-step trials, 1 seed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LR, RANK, WARMUP = "hyperparameters.learningRate", "method.lora.rank", "hyperparameters.warmupRatio"
SEARCHES = ("grid", "random", "tpe+asha")
WORDS = ["pod", "node", "job", "model", "queue", "cluster", "runs", "waits", "trains", "fails", "saves", "loads",
         "the", "a", "quickly", "slowly", "again", "today", "checkpoint", "step", "loss", "falls", "rises"]


def space(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"name": LR, "type": "logUniform", "min": 1e-3, "max": 3e-2},
                {"name": RANK, "type": "categorical", "values": [4]},
                {"name": WARMUP, "type": "uniform", "min": 0.0, "max": 0.2}]
    return [{"name": LR, "type": "logUniform", "min": 1e-4, "max": 3e-2},
            {"name": RANK, "type": "categorical", "values": [2, 8, 32]},
            {"name": WARMUP, "type": "uniform", "min": 0.0, "max": 0.3}]


def sweep_spec(algorithm: str, seed: int, quick: bool, eval_interval: int, max_trials: int) -> dict[str, Any]:
    """The FineTuneSweep spec the search runs under (the template only has to be valid)."""
    template = {"model": {"source": "pvc://m/tiny"}, "dataset": {"format": "text", "train": {"source": "pvc://d/t"}},
                "output": {"storage": "pvc://o/x"}, "method": {"type": "lora"}}
    spec: dict[str, Any] = {"template": template, "parameters": space(quick), "maxTrials": max_trials,
                            "parallelTrials": 1, "algorithm": {"type": algorithm, "seed": seed, "gridPoints": 2 if quick else 3,
                                                               "startupTrials": 3 if quick else 5}}
    if algorithm == "tpe":
        spec["earlyTermination"] = {"type": "asha", "minResource": eval_interval, "reductionFactor": 3}
    return spec


def texts(count: int, seed: int) -> list[dict[str, str]]:
    """Sentences with a learnable pattern (subject, verb, adverb) and some noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        subject = rng.choice(WORDS[:6])
        out.append({"text": f"the {subject} {rng.choice(WORDS[6:12])} {rng.choice(WORDS[12:17])} "
                            f"and the {subject} {rng.choice(WORDS[17:])} {rng.choice(WORDS)}."})
    return out


class Pruned(Exception):
    """Raised from the reporter to stop a trial the pruner rejected."""


class TrialReporter:
    """Stands in for the trainer's Reporter: feeds each validation loss to the study and stops the trial
    when the pruner says so."""

    def __init__(self, study: Any, index: int) -> None:
        self.study, self.index = study, index
        self.curve: list[tuple[int, float]] = []

    def report(self, kind: str, **fields: Any) -> None:
        if kind != "evaluation" or fields.get("valLoss") is None:
            return
        step, loss = int(fields["step"]), float(fields["valLoss"])
        self.curve.append((step, loss))
        if self.study is not None and step > 0 and self.study.report(self.index, step, loss):
            raise Pruned(step)


def run_search(search: str, seed: int, quick: bool, steps: int, eval_interval: int, workdir: Path) -> dict[str, Any]:
    """One search in this process; returns its trials and CPU-seconds."""
    from kubetune.api import config as cfg
    from kubetune.dev import tinymodel
    from kubetune.operator.sweeps import reconcile as sweep, study as sweep_study
    from kubetune.operator.sweeps.models import FineTuneSweepSpec
    from kubetune.trainer.__main__ import load_data
    from kubetune.trainer.training import train

    model = workdir / "model"
    if not (model / "config.json").exists():
        tinymodel.create_tiny_model(model, arch="gpt2", seed=0)
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in texts(120 if quick else 400, seed=100)))
    algorithm = {"grid": "grid", "random": "random", "tpe+asha": "tpe"}[search]
    grid_spec = FineTuneSweepSpec.from_dict(sweep_spec("grid", seed, quick, eval_interval, 500))
    grid_trials = sweep.trial_count(grid_spec)
    budget = grid_trials * steps if search == "grid" else grid_trials * steps // 3
    spec = FineTuneSweepSpec.from_dict(sweep_spec(algorithm, seed, quick, eval_interval, 500))
    study = sweep_study.new_study(spec, "minimize") if search == "tpe+asha" else None
    batch = 8

    def trial_config(values: dict[str, Any], index: int) -> Any:
        return cfg.config_from_dict({
            "model": {"source": str(model)},
            "dataset": {"format": "text", "train": {"source": str(data)}, "split": {"validation": 0.15, "seed": 7}},
            "method": {"type": "lora", "lora": {"rank": int(values[RANK]), "alpha": 2 * int(values[RANK])}},
            "hyperparameters": {"epochs": 12, "learningRate": float(values[LR]), "warmupRatio": float(values[WARMUP]),
                                "batchSize": batch, "gradientAccumulationSteps": 1, "seed": seed, "maxSeqLength": 64,
                                "scheduler": "cosine"},
            "training": {"evalInterval": eval_interval, "keepBest": False, "checkpointInterval": 10**6},
            "output": {"dir": str(workdir / f"out-{search}-{index}")},
        })

    tokenizer, prepared = load_data(trial_config({LR: 1e-3, RANK: 2, WARMUP: 0.0}, 0), synthetic=False)
    started_cpu, started_wall = time.process_time(), time.monotonic()
    spent, trials = 0, []
    index = 0
    while spent < budget and (search != "grid" or index < grid_trials):
        if study is not None:
            values = study.ask(index)
        else:
            values = sweep.trial_parameters(spec, index)
        config = trial_config(values, index)
        run = train.setup(config, prepared, tokenizer)
        # The trial's length is `steps` optimizer steps; the schedule (warmup, cosine) spans exactly those.
        length = min(steps, budget - spent)  # the budget is a hard limit: the last trial may be cut short
        run.epoch_steps = _cap(run.epoch_steps, length)
        run.scheduler = train._scheduler(run.optimizer, run.hp, run.total_steps)
        reporter = TrialReporter(study, index)
        outcome = "complete"
        try:
            state = train.fit(run, reporter)  # type: ignore[arg-type]
            ran = state.step
            outcome = "complete" if length == steps else "cut"
        except Pruned as stop:
            ran, outcome = int(stop.args[0]), "pruned"
        spent += ran
        last = reporter.curve[-1][1] if reporter.curve else float("nan")
        if study is not None:
            if outcome == "complete":
                study.tell(index, "Complete", last)
            else:
                study.tell(index, "Pruned")  # pruned, or cut short by the budget
        trials.append({"index": index, "params": values, "steps": ran, "outcome": outcome, "valLoss": last,
                       "spentAfter": spent})
        index += 1
    return {"search": search, "seed": seed, "trials": trials, "trialSteps": spent, "budget": budget,
            "gridTrials": grid_trials, "stepsPerTrial": steps,
            "cpuSeconds": round(time.process_time() - started_cpu, 1),
            "wallSeconds": round(time.monotonic() - started_wall, 1)}


def _cap(epoch_steps: list[int], steps: int) -> list[int]:
    capped, left = [], steps
    for count in epoch_steps:
        if left <= 0:
            break
        capped.append(min(count, left))
        left -= capped[-1]
    return capped


def best_within(result: dict[str, Any], budget: float) -> float | None:
    """Best validation loss of a trial that ran to its end within `budget` trial-steps."""
    done = [t["valLoss"] for t in result["trials"] if t["outcome"] == "complete" and t["spentAfter"] <= budget
            and math.isfinite(t["valLoss"])]
    return min(done) if done else None


def child(args: argparse.Namespace) -> int:
    import logging

    logging.disable(logging.WARNING)
    os.environ.setdefault("KUBETUNE_PROGRESS_INTERVAL", "1000")
    result = run_search(args.child, args.seed, args.quick, args.steps, args.eval_interval, Path(args.workdir))
    print("CHILD " + json.dumps(result))
    return 0


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.4f} / {statistics.median(values):.4f} / {max(values):.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny space, few steps, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of a trial that runs to its end")
    parser.add_argument("--eval-interval", type=int, default=5)
    parser.add_argument("--parallel", action="store_true",
                        help="run the seeds at the same time (each seed's searches still one after another); "
                             "CPU-seconds are per process, so this changes wall time, not the figures")
    parser.add_argument("--child", choices=SEARCHES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.eval_interval = 1, 4, 2
    if args.child:
        return child(args)

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SEARCHES}
    with tempfile.TemporaryDirectory(prefix="sweep-efficiency-") as tmp:
        def run_seed(seed: int) -> list[dict[str, Any]]:
            workdir = Path(tmp) / f"seed-{seed}"
            workdir.mkdir()
            done = []
            for search in SEARCHES[seed % 3:] + SEARCHES[:seed % 3]:  # alternate which search runs first
                command = [sys.executable, __file__, "--child", search, "--seed", str(seed), "--workdir", str(workdir),
                           "--steps", str(args.steps), "--eval-interval", str(args.eval_interval)]
                if args.quick:
                    command.append("--quick")
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{search} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                line = next(x for x in proc.stdout.splitlines() if x.startswith("CHILD "))
                result = json.loads(line.removeprefix("CHILD "))
                done.append(result)
                print(f"seed {seed} {search:9s}: {len(result['trials'])} trials, {result['trialSteps']} trial-steps, "
                      f"best {best_within(result, float('inf'))}, {result['cpuSeconds']} CPU-s", flush=True)
            return done

        seeds = list(range(args.seeds))
        if args.parallel:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(seeds)) as pool:
                per_seed = list(pool.map(run_seed, seeds))
        else:
            per_seed = [run_seed(seed) for seed in seeds]
        for done in per_seed:
            for result in done:
                results[result["search"]].append(result)

    grid_budget = results["grid"][0]["budget"]
    budgets = {"B/9": grid_budget / 9, "B/3": grid_budget / 3, "B": grid_budget}
    print(f"\nbudget B = grid's {results['grid'][0]['gridTrials']} trials x {args.steps} steps = {grid_budget} "
          f"trial-steps; {args.seeds} seeds; min / median / max over seeds")
    print(f"{'search':10s} {'best valLoss at B/9':>26s} {'at B/3':>26s} {'at B':>26s} {'trial-steps':>12s} "
          f"{'CPU-seconds':>24s}")
    summary: dict[str, Any] = {"budget": grid_budget, "seeds": args.seeds, "stepsPerTrial": args.steps}
    for search in SEARCHES:
        rows = results[search]
        cells = []
        for label, budget in budgets.items():
            found = [v for v in (best_within(r, budget) for r in rows) if v is not None]
            cells.append(spread(found))
            summary[f"{search}BestAt{label.replace('/', 'over')}"] = found
        steps = [r["trialSteps"] for r in rows]
        cpu = [r["cpuSeconds"] for r in rows]
        summary[f"{search}TrialSteps"], summary[f"{search}CpuSeconds"] = steps, cpu
        summary[f"{search}Pruned"] = [sum(t["outcome"] == "pruned" for t in r["trials"]) for r in rows]
        print(f"{search:10s} {cells[0]:>26s} {cells[1]:>26s} {cells[2]:>26s} {statistics.median(steps):>12.0f} "
              f"{spread(cpu):>24s}")
    grid_best = [best_within(r, float("inf")) for r in results["grid"]]
    tpe_best = [best_within(r, float("inf")) for r in results["tpe+asha"]]
    ratios = [t / g for t, g in zip(tpe_best, grid_best) if t is not None and g is not None]
    step_ratios = [t["trialSteps"] / g["trialSteps"] for t, g in zip(results["tpe+asha"], results["grid"])]
    summary["tpeOverGridBestRatio"] = ratios
    summary["tpeOverGridTrialStepsRatio"] = step_ratios
    if ratios:
        print(f"\nTPE+ASHA best / grid best (same seed): {spread(ratios)}  (target <= 1.02)")
    print(f"TPE+ASHA trial-steps / grid trial-steps: {spread(step_ratios)}  (target <= 0.333)")
    print("RESULT " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
