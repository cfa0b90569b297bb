"""What `kubetune sweep NAME` shows: a FineTuneSweep's trials as a table, and two plots.

- `trials_table(sweep)`: one row per trial (index, state, each parameter, the
  objective, the last validation loss, steps, duration, why it stopped);
- `plot_objective(sweep, path)`: the objective of each finished trial by trial
  index, and the best so far (the search's progress);
- `plot_parallel_coordinates(sweep, path)`: one line per trial across the
  parameters (scaled to their range, log for logUniform) to the objective,
  coloured by the objective (which regions of the space did well).

Reads only the sweep's status (and its spec for the parameter ranges), so it
works on any cluster the current kubeconfig reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Body = dict[str, Any]


def _short(name: str) -> str:
    """`hyperparameters.learningRate` -> `learningRate`, `method.lora.rank` -> `lora.rank`."""
    return name.removeprefix("hyperparameters.").removeprefix("method.")


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int):
        return "-"
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def parameter_names(sweep: Body) -> list[str]:
    return [str(p["name"]) for p in (sweep.get("spec") or {}).get("parameters") or []]


def trials_table(sweep: Body) -> str:
    """The trials as aligned text columns, the best trial marked with `*`, and a summary line."""
    status = sweep.get("status") or {}
    names = parameter_names(sweep)
    metric = str(status.get("objectiveMetric") or "objective")
    best = (status.get("bestTrial") or {}).get("index")
    header = ["#", "state", *(_short(n) for n in names), metric, "valLoss", "step", "duration", "message"]
    rows = [header]
    for trial in status.get("trials") or []:
        parameters = trial.get("parameters") or {}
        mark = "*" if trial.get("index") == best else ""
        rows.append([f"{trial.get('index')}{mark}", str(trial.get("state", "-")),
                     *(_number(parameters.get(n)) for n in names), _number(trial.get("objective")),
                     _number(trial.get("valLoss")), _number(trial.get("step")), _duration(trial.get("duration")),
                     str(trial.get("message", ""))[:60]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    counts = status.get("counts") or {}
    summary = (f"{sweep['metadata']['name']}: {status.get('phase', 'Pending')}, {counts.get('completed', 0)} of "
               f"{counts.get('total', '?')} trials done ({counts.get('succeeded', 0)} succeeded, "
               f"{counts.get('pruned', 0)} pruned, {counts.get('failed', 0)} failed); goal {status.get('goal', '-')} "
               f"{metric}")
    if status.get("bestTrial"):
        bt = status["bestTrial"]
        values = ", ".join(f"{_short(k)}={_number(v)}" for k, v in (bt.get("parameters") or {}).items())
        summary += f"; best trial {bt.get('name')} ({values}) with {_number(bt.get('objective'))}"
    return "\n".join([summary, "", *lines])


def _finished_points(sweep: Body) -> list[tuple[int, float, str]]:
    """(index, objective or last intermediate value, state) of trials with a value."""
    status = sweep.get("status") or {}
    points = []
    for trial in status.get("trials") or []:
        value = trial.get("objective")
        if not isinstance(value, (int, float)):
            continue
        points.append((int(trial["index"]), float(value), str(trial.get("state"))))
    return points


def plot_objective(sweep: Body, path: Path) -> Path:
    """Objective by trial index (succeeded trials) with the best so far as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = sweep.get("status") or {}
    metric = str(status.get("objectiveMetric") or "objective")
    maximize = status.get("goal") == "maximize"
    points = sorted(_finished_points(sweep))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, color="tab:blue", label=f"{metric} per trial", zorder=3)
        best: list[float] = []
        for y in ys:
            best.append(y if not best else (max(best[-1], y) if maximize else min(best[-1], y)))
        ax.step(xs, best, where="post", color="tab:orange", label="best so far")
    pruned = [t for t in status.get("trials") or [] if t.get("state") == "Pruned"]
    for trial in pruned:
        ax.axvline(int(trial["index"]), color="tab:gray", alpha=0.25, linewidth=1)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep['metadata']['name']}: {metric} by trial" + (" (grey: pruned)" if pruned else ""))
    if points:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _scaled(value: float, spec: Body) -> float:
    low, high = spec.get("min"), spec.get("max")
    if spec.get("type") == "categorical":
        values = list(spec.get("values") or [])
        return values.index(value) / max(1, len(values) - 1) if value in values else 0.5
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or high <= low:
        return 0.5
    if spec.get("type") == "logUniform" and low > 0 and value > 0:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def plot_parallel_coordinates(sweep: Body, path: Path) -> Path:
    """One line per trial with an objective: each parameter scaled to [0, 1] over its range, then the
    objective (scaled over the values seen), coloured by the objective (best: dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    status = sweep.get("status") or {}
    specs = {str(p["name"]): p for p in (sweep.get("spec") or {}).get("parameters") or []}
    names = list(specs)
    metric = str(status.get("objectiveMetric") or "objective")
    trials = [t for t in status.get("trials") or [] if isinstance(t.get("objective"), (int, float))]
    fig, ax = plt.subplots(figsize=(2 + 1.8 * (len(names) + 1), 4), dpi=100)
    if trials:
        values = [float(t["objective"]) for t in trials]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        colormap = plt.get_cmap("viridis" if status.get("goal") != "maximize" else "viridis_r")  # best: dark
        for trial, value in zip(trials, values):
            ys = [_scaled(float((trial.get("parameters") or {}).get(n, 0.0)), specs[n]) for n in names]
            ys.append((value - low) / span)
            ax.plot(range(len(ys)), ys, color=colormap((value - low) / span), alpha=0.8, marker="o")
        ax.text(len(names), 1.02, _number(high), ha="center", fontsize=8)
        ax.text(len(names), -0.07, _number(low), ha="center", fontsize=8)
    for i, name in enumerate(names):
        spec = specs[name]
        ax.text(i, 1.02, _number(spec.get("max", (spec.get("values") or ["-"])[-1])), ha="center", fontsize=8)
        ax.text(i, -0.07, _number(spec.get("min", (spec.get("values") or ["-"])[0])), ha="center", fontsize=8)
    ax.set_xticks(range(len(names) + 1), [*(_short(n) for n in names), metric])
    for x in range(len(names) + 1):
        ax.axvline(x, color="black", linewidth=0.6)
    ax.set_yticks([])
    ax.set_ylim(-0.1, 1.1)
    ax.set_title(f"{sweep['metadata']['name']}: parameters and {metric} of {len(trials)} trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def output_folder(sweep: Body, requested: str | None) -> Path:
    """Where the plots go: `requested`; else next to the sweep's output when the template's storage is a
    local folder (`<storage>/<sweep>-sweep`); else `./<sweep>-sweep`."""
    name = sweep["metadata"]["name"]
    if requested:
        return Path(requested)
    storage = str((((sweep.get("spec") or {}).get("template") or {}).get("output") or {}).get("storage") or "")
    local = storage.removeprefix("file://")
    if local.startswith("/") and Path(local).is_dir():
        return Path(local) / f"{name}-sweep"
    return Path(f"{name}-sweep")


def write_report(sweep: Body, folder: Path) -> Sequence[Path]:
    """The two plots in `folder`."""
    return (plot_objective(sweep, folder / "objective.png"),
            plot_parallel_coordinates(sweep, folder / "parallel_coordinates.png"))
