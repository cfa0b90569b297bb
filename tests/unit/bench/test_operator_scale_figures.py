"""The operator bench's figures count every job: percentiles over all of them, the unfinished ones as
'not reached', and a run where the operator fell behind the creation rate is marked saturated."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def _operator_scale() -> Any:
    spec = importlib.util.spec_from_file_location("operator_scale", REPO / "bench" / "operator_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _operator_scale()


def test_percentiles_count_jobs_that_never_got_there_as_not_reached() -> None:
    measured = [0.1 * i for i in range(1, 61)]  # 60 of 100 jobs reached their trainer Job

    assert bench.quantile(measured, 40, 0.5) is not None  # the 50th job of 100 is among the 60
    assert bench.quantile(measured, 40, 0.99) is None  # the 99th is not: not reached, never left out
    line = bench.percentiles(measured, 100)
    assert "p99 not reached" in line and "max not reached" in line and "40 not reached" in line
    assert "over all 100 jobs" in line


def test_percentiles_over_a_complete_run_are_the_plain_ones() -> None:
    line = bench.percentiles([0.2, 0.4, 0.3], 3)
    assert line.startswith("p50 0.300 s  p99 0.400 s  max 0.400 s  (over all 3 jobs)")
    assert bench._p([0.2, 0.4, 0.3], 3, 0.5) == 0.3 and bench._p([0.2], 2, 0.99) is None


def test_a_run_that_fell_behind_the_creation_rate_is_saturated() -> None:
    created = {f"job-{i}": i / 10 for i in range(100)}  # 10 per second over 10 s
    kept_up = {name: t + 0.2 for name, t in created.items()}
    fell_behind = {name: t * 4 for name, t in created.items()}  # handled at ~2.5/s

    assert bench.saturation(created, kept_up, 10.0)[0] is False
    saturated, handled = bench.saturation(created, fell_behind, 10.0)
    assert saturated and handled < 3
    missing = dict(list(kept_up.items())[:90])
    assert bench.saturation(created, missing, 10.0)[0] is True  # jobs left unhandled


def test_the_controller_manager_is_not_the_bottleneck() -> None:
    """Its default client limit (20 requests/s) is below what 10 jobs/s need from the Job controller."""
    assert bench.CONTROLLER_MANAGER_QPS >= 100 and bench.CONTROLLER_MANAGER_BURST >= bench.CONTROLLER_MANAGER_QPS


def test_per_tenth_figures_show_a_latency_that_grows_over_the_run_and_count_every_job() -> None:
    created = {f"job-{i:03d}": i / 10 for i in range(100)}
    acted = {name: t + (0.01 if i < 50 else 1.0) for i, (name, t) in enumerate(created.items()) if i != 99}
    lines = bench.by_tenth(created, created, acted)
    assert len(lines) == 10
    assert "p50        10 ms" in lines[0] and "p50      1000 ms" in lines[8]
    assert "p99  not reached" in lines[9] and "(1 not reached)" in lines[9]


def test_the_comparison_spread_names_runs_where_a_figure_was_not_reached() -> None:
    assert bench._spread([0.3, 0.1, 0.2]) == "0.1 / 0.2 / 0.3"
    assert bench._spread([0.3, None]) == "not reached in 1 of 2 runs"
