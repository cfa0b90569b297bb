"""Operator metrics: states counted once, tokens counted once, GPU time accrued between observations."""

from __future__ import annotations

from kubetune.operator.metrics import OperatorMetrics


def value(metrics: OperatorMetrics, series: str, /, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(series, labels)


def test_jobs_move_between_states() -> None:
    metrics = OperatorMetrics()
    metrics.observe_state("a", "j1", "Running")
    metrics.observe_state("a", "j2", "Running")
    metrics.observe_state("a", "j1", "Running")
    assert value(metrics, "kubetune_jobs", namespace="a", state="Running") == 2
    metrics.observe_state("a", "j1", "Succeeded")
    assert value(metrics, "kubetune_jobs", namespace="a", state="Running") == 1
    assert value(metrics, "kubetune_jobs", namespace="a", state="Succeeded") == 1
    metrics.forget_job("a", "j2")
    assert value(metrics, "kubetune_jobs", namespace="a", state="Running") == 0


def test_gpu_seconds_accrue_while_a_job_holds_gpus() -> None:
    metrics = OperatorMetrics()
    metrics.observe_gpus("a", "j1", 2, now=100.0)
    metrics.observe_gpus("a", "j1", 2, now=110.0)
    metrics.observe_gpus("a", "j1", 0, now=115.0)
    metrics.observe_gpus("a", "j1", 0, now=500.0)
    assert value(metrics, "kubetune_gpu_seconds_total", namespace="a") == 30.0


def test_tokens_are_counted_once_across_repeated_reports_and_resumed_attempts() -> None:
    metrics = OperatorMetrics()
    metrics.observe_report("a", "j1", 0, {"tokensSeen": 1000})
    metrics.observe_report("a", "j1", 0, {"tokensSeen": 1000})
    metrics.observe_report("a", "j1", 0, {"tokensSeen": 1500})
    metrics.observe_report("a", "j1", 1, {"tokensSeen": 1400})  # resumed from an earlier checkpoint
    metrics.observe_report("a", "j1", 1, {"tokensSeen": 2000})
    assert value(metrics, "kubetune_tokens_processed_total", namespace="a") == 2000


def test_per_job_gauges_and_report_counters() -> None:
    metrics = OperatorMetrics()
    metrics.observe_report("a", "j1", 0, {"trainLoss": 2.5, "valLoss": 2.75, "step": 25, "totalSteps": 100})
    metrics.report_accepted()
    metrics.report_rejected("WrongToken")
    assert value(metrics, "kubetune_job_train_loss", namespace="a", name="j1") == 2.5
    assert value(metrics, "kubetune_job_validation_loss", namespace="a", name="j1") == 2.75
    assert value(metrics, "kubetune_job_progress_ratio", namespace="a", name="j1") == 0.25
    assert value(metrics, "kubetune_progress_reports_total", result="rejected", reason="WrongToken") == 1
    metrics.observe_finished("a", "Succeeded", 120.0)
    assert value(metrics, "kubetune_job_duration_seconds_count", namespace="a", outcome="Succeeded") == 1
    metrics.forget_job("a", "j1")
    assert value(metrics, "kubetune_job_train_loss", namespace="a", name="j1") is None
