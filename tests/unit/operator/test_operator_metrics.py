"""Operator metrics: states counted once; usage counters follow status.usage, not reports."""

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


def test_reports_do_not_count_tokens_only_the_stored_usage_does() -> None:
    # A report is the tenant's word (anyone with the job's token can send one): it moves the
    # throughput gauge, never the chargeback counter.
    metrics = OperatorMetrics()
    metrics.observe_report("a", "j1", 0, {"tokensSeen": 1000, "tokensPerSecond": 250.0})
    metrics.observe_report("a", "j1", 1, {"tokensSeen": 2000})
    assert value(metrics, "kubetune_tokens_processed_total", namespace="a", tenant="a") is None
    assert value(metrics, "kubetune_job_tokens_per_second", namespace="a", name="j1") == 250.0
    metrics.observe_usage("a", "j1", "a", {"tokensProcessed": 1800})
    metrics.observe_usage("a", "j1", "a", {"tokensProcessed": 1800})
    assert value(metrics, "kubetune_tokens_processed_total", namespace="a", tenant="a") == 1800


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


def test_reconcile_errors_are_counted_by_cause() -> None:
    """A dashboard must tell a busy API server (retried, nobody's bug) from the operator's own error."""
    import socket

    import kubernetes
    from kubernetes.client.exceptions import ApiException

    from kubetune.operator.client import ChildConflict, KubeClient, error_cause

    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    try:
        KubeClient(kubernetes.client.ApiClient(configuration)).get_finetunejob("ns", "job")
    except Exception as error:  # noqa: BLE001 - what a reconcile would meet
        refused: BaseException = error
    else:
        raise AssertionError("a refused connection raised nothing")
    assert error_cause(refused) == "api", repr(refused)
    assert error_cause(ApiException(status=500, reason="etcdserver: request timed out")) == "api"
    assert error_cause(ChildConflict("Job ns/x-validate exists and is not in the cache")) == "conflict"
    assert error_cause(KeyError("metadata")) == "internal"

    metrics = OperatorMetrics()
    metrics.reconcile_failed("a", error_cause(refused))
    metrics.reconcile_failed("a", error_cause(KeyError("metadata")))
    metrics.reconcile_failed("a", error_cause(KeyError("metadata")))
    assert value(metrics, "kubetune_reconcile_errors_total", namespace="a", cause="api") == 1
    assert value(metrics, "kubetune_reconcile_errors_total", namespace="a", cause="internal") == 2
