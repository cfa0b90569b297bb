"""Prometheus metrics of the operator, in a registry of their own.

Series (all prefixed `kubetune_`):

- `jobs{namespace,state}`: FineTuneJobs by state (Validating, Pending, Running, Suspended, Succeeded, Failed);
- `job_duration_seconds{namespace,outcome}`: histogram of start-to-completion time of finished jobs;
- `job_train_loss`, `job_validation_loss`, `job_progress_ratio{namespace,name}`: latest values per job;
- `job_test_metric{namespace,name,model,metric}`: the test-split results of the fine-tuned model
  (`model="tuned"`) and of the base model (`model="base"`): loss, perplexity, tokenAccuracy, and
  accuracy/precision/recall/f1 for classification;
- `job_improvement{namespace,name,metric}`: tuned against base (`status.results.improvement`);
- `tokens_processed_total{namespace,tenant}`: training tokens processed, from `status.usage` (the
  trainer pods' own termination messages), summed over jobs;
- `accelerator_seconds_total{namespace,tenant,kind}`, `cpu_seconds_total{namespace,tenant,kind}`:
  from `status.usage` (kind training, validation or serving), summed over jobs (chargeback);
- `job_tokens_per_second{namespace,name}`: the latest reported training throughput;
- `job_queue_wait_seconds{namespace}`: histogram of creation-to-first-trainer-start time;
- `job_attempts{namespace,name}`: trainer pods of an unfinished job (retries show as > 1);
- `job_stalled{namespace,name}`: 1 while a running job's step has not advanced for
  `training.stallTimeoutSeconds`;
- `serving_ready{namespace,name}`: 1 while a finished job's serving has an available replica, 0 while
  it should serve and does not (absent when serving is off);
- `reconcile_errors_total{namespace,cause}`: reconciles that raised, by cause (`api`: the API
  server's error answer or a lost connection; `conflict`: a child's name held by an object not ours;
  `internal`: the operator's own error, a bug);
- `progress_reports_total{result,reason}`: reports accepted / rejected (by reason).

`OperatorMetrics` keeps the bookkeeping that turns observations into these
series (a job counted once per state); it is pure apart from prometheus-client.
The usage counters are not incremented by observations: they are the sums of
what each job's `status.usage` holds, so an operator that restarts exports the
same totals again as soon as it has seen the jobs (nothing counted twice), and
a deleted job's last figures stay in the sums for the life of the process.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kubetune.operator.platform import usage as usage_

CONTENT_TYPE = CONTENT_TYPE_LATEST
QUEUE_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)
"""Seconds from creation until the first trainer pod ran: validation takes seconds, a full queue hours."""
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600, 72 * 3600)
"""Fine-tuning runs last minutes to days."""


TEST_METRICS = ("loss", "perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1")
"""The test-split metrics exported per model (base and tuned)."""


@dataclasses.dataclass
class _JobUsage:
    """The figures of one job's `status.usage` as exported (never lower than exported before)."""

    tenant: str
    values: dict[tuple[str, str], float]
    """(series, kind) -> value; series is accelerator, cpu or tokens (kind "")."""


class UsageCollector(Collector):
    """Counters that are sums of the jobs' stored usage (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], _JobUsage] = {}
        self.retired: dict[tuple[str, str, str, str], float] = {}
        """(namespace, tenant, series, kind) -> the figures of deleted jobs."""

    def observe(self, namespace: str, name: str, tenant: str, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        values: dict[tuple[str, str], float] = {}
        for kind in usage_.KINDS:
            totals = usage.get(kind) or {}
            values[("accelerator", kind)] = float(totals.get("acceleratorSeconds") or 0)
            values[("cpu", kind)] = float(totals.get("cpuSeconds") or 0)
        values[("tokens", "")] = float(usage.get("tokensProcessed") or 0)
        known = self.jobs.get((namespace, name))
        if known is not None and known.tenant == tenant:
            # A counter must not go down: a pod whose finish the kubelet reported late can lower a
            # stored total a little; the exported figure holds until the stored one passes it.
            values = {k: max(v, known.values.get(k, 0.0)) for k, v in values.items()}
        elif known is not None:
            self._retire(namespace, known)
        self.jobs[(namespace, name)] = _JobUsage(tenant, values)

    def forget(self, namespace: str, name: str) -> None:
        known = self.jobs.pop((namespace, name), None)
        if known is not None:
            self._retire(namespace, known)

    def _retire(self, namespace: str, known: _JobUsage) -> None:
        for (series, kind), value in known.values.items():
            key = (namespace, known.tenant, series, kind)
            self.retired[key] = self.retired.get(key, 0.0) + value

    def totals(self) -> dict[tuple[str, str, str, str], float]:
        """(namespace, tenant, series, kind) -> the sum over live and deleted jobs."""
        found = dict(self.retired)
        for (namespace, _name), job in list(self.jobs.items()):
            for (series, kind), value in job.values.items():
                key = (namespace, job.tenant, series, kind)
                found[key] = found.get(key, 0.0) + value
        return found

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for (namespace, tenant, series, kind), value in sorted(self.totals().items()):
            if series == "tokens":
                families[2].add_metric([namespace, tenant], value)
            else:
                families[0 if series == "accelerator" else 1].add_metric([namespace, tenant, kind], value)
        return iter(families)

    @staticmethod
    def _families() -> list[CounterMetricFamily]:
        return [
            CounterMetricFamily("kubetune_accelerator_seconds",
                                "Accelerator-seconds (GPUs and other devices allocated to the pods) from "
                                "status.usage, by kind: training, validation, serving",
                                labels=["namespace", "tenant", "kind"]),
            CounterMetricFamily("kubetune_cpu_seconds",
                                "CPU-seconds (allocated CPUs x running time) from status.usage, by kind",
                                labels=["namespace", "tenant", "kind"]),
            CounterMetricFamily("kubetune_tokens_processed",
                                "Training tokens processed, from the trainer pods' termination messages "
                                "(status.usage)", labels=["namespace", "tenant"]),
        ]


class OperatorMetrics:
    """The operator's series and the bookkeeping behind them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Gauge("kubetune_jobs", "FineTuneJobs by namespace and state",
                          ["namespace", "state"], registry=self.registry)
        self.job_duration = Histogram("kubetune_job_duration_seconds",
                                      "Start-to-completion time of finished FineTuneJobs",
                                      ["namespace", "outcome"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.train_loss = Gauge("kubetune_job_train_loss", "Latest training loss of a job",
                                ["namespace", "name"], registry=self.registry)
        self.val_loss = Gauge("kubetune_job_validation_loss", "Latest validation loss of a job",
                              ["namespace", "name"], registry=self.registry)
        self.progress = Gauge("kubetune_job_progress_ratio", "Training progress of a job, 0 to 1",
                              ["namespace", "name"], registry=self.registry)
        self.usage = UsageCollector()
        self.registry.register(self.usage)
        self.tokens_per_second = Gauge("kubetune_job_tokens_per_second", "Latest reported training throughput",
                                       ["namespace", "name"], registry=self.registry)
        self.queue_wait = Histogram("kubetune_job_queue_wait_seconds",
                                    "Time from a FineTuneJob's creation until its trainer first ran",
                                    ["namespace"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.attempts = Gauge("kubetune_job_attempts", "Trainer pods started for an unfinished job",
                              ["namespace", "name"], registry=self.registry)
        self.stalled = Gauge("kubetune_job_stalled",
                             "1 while a running job's step has not advanced for training.stallTimeoutSeconds",
                             ["namespace", "name"], registry=self.registry)
        self.serving_ready = Gauge("kubetune_serving_ready",
                                   "1 while a finished job's serving has an available replica, else 0",
                                   ["namespace", "name"], registry=self.registry)
        self.reconcile_errors = Counter("kubetune_reconcile_errors", "Reconciles that raised an error, by cause",
                                        ["namespace", "cause"], registry=self.registry)
        self.reports = Counter("kubetune_progress_reports", "Progress reports by result",
                               ["result", "reason"], registry=self.registry)
        self.resync_passes = Counter("kubetune_resync_passes", "Passes of the periodic resync",
                                     ["resource"], registry=self.registry)
        self.resync_undelivered = Counter(
            "kubetune_resync_undelivered",
            "Objects a resync pass reconciled that kopf had not delivered (a late or stalled watch)",
            ["resource"], registry=self.registry)
        self.test_metric = Gauge("kubetune_job_test_metric",
                                 "Test-split metric of a job's fine-tuned (model=tuned) or base (model=base) model",
                                 ["namespace", "name", "model", "metric"], registry=self.registry)
        self.improvement = Gauge("kubetune_job_improvement",
                                 "Fine-tuned against base model on the test split: perplexityDrop (relative), "
                                 "lossDrop (nats), *Gain (percentage points)",
                                 ["namespace", "name", "metric"], registry=self.registry)
        self._result_series: dict[tuple[str, str], set[tuple[str, ...]]] = {}
        self._states: dict[tuple[str, str], str] = {}

    def exposition(self) -> bytes:
        """The text exposition format of every series."""
        return generate_latest(self.registry)

    # -- job states --------------------------------------------------------------

    def observe_state(self, namespace: str, name: str, state: str) -> None:
        """Count the job under `state` (and no longer under its previous state)."""
        key = (namespace, name)
        previous = self._states.get(key)
        if previous == state:
            return
        if previous is not None:
            self.jobs.labels(namespace, previous).dec()
        self.jobs.labels(namespace, state).inc()
        self._states[key] = state

    def observe_finished(self, namespace: str, outcome: str, duration_seconds: float) -> None:
        """Record a job's duration when it reaches a terminal state (once per transition)."""
        self.job_duration.labels(namespace, outcome).observe(max(0.0, duration_seconds))

    def forget_job(self, namespace: str, name: str) -> None:
        """Remove a deleted job's per-job series and its state count."""
        state = self._states.pop((namespace, name), None)
        if state is not None:
            self.jobs.labels(namespace, state).dec()
        for gauge in (self.train_loss, self.val_loss, self.progress, self.tokens_per_second, self.attempts,
                      self.stalled, self.serving_ready):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        self.usage.forget(namespace, name)
        for labels in self._result_series.pop((namespace, name), set()):
            gauge = self.test_metric if len(labels) == 2 else self.improvement
            try:
                gauge.remove(namespace, name, *labels)
            except KeyError:
                pass

    # -- test results ------------------------------------------------------------------

    def observe_results(self, namespace: str, name: str, results: object) -> None:
        """Export `status.results`: the tuned model's test metrics, the baseline's, the improvement."""
        if not isinstance(results, dict):
            return
        series = self._result_series.setdefault((namespace, name), set())
        baseline = results.get("baseline")
        for model, values in (("tuned", results), ("base", baseline if isinstance(baseline, dict) else {})):
            for metric in TEST_METRICS:
                value = values.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.test_metric.labels(namespace, name, model, metric).set(float(value))
                    series.add((model, metric))
        improvement = results.get("improvement")
        for metric, value in (improvement.items() if isinstance(improvement, dict) else ()):
            if isinstance(metric, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.improvement.labels(namespace, name, metric).set(float(value))
                series.add((metric,))

    # -- usage and health -----------------------------------------------------------

    def observe_usage(self, namespace: str, name: str, tenant: str, usage: Any) -> None:
        """The job's `status.usage` as stored: the usage counters follow it (see UsageCollector)."""
        self.usage.observe(namespace, name, tenant, usage)

    def observe_queue_wait(self, namespace: str, seconds: float) -> None:
        """Once per job, when its trainer first started: how long it waited since creation."""
        self.queue_wait.labels(namespace).observe(max(0.0, seconds))

    def observe_health(self, namespace: str, name: str, *, attempts: int | None, stalled: bool | None,
                       serving_ready: bool | None) -> None:
        """Per-job health gauges; None removes the series (the job finished, or serves nothing)."""
        for gauge, value in ((self.attempts, attempts), (self.stalled, stalled), (self.serving_ready, serving_ready)):
            if value is None:
                try:
                    gauge.remove(namespace, name)
                except KeyError:
                    pass
            else:
                gauge.labels(namespace, name).set(float(value))

    # -- reports ---------------------------------------------------------------------

    def observe_report(self, namespace: str, name: str, attempt: int, values: dict[str, object]) -> None:
        """Update per-job gauges and the token counter from an accepted report."""
        train_loss, val_loss = values.get("trainLoss"), values.get("valLoss")
        if isinstance(train_loss, (int, float)):
            self.train_loss.labels(namespace, name).set(float(train_loss))
        if isinstance(val_loss, (int, float)):
            self.val_loss.labels(namespace, name).set(float(val_loss))
        step, total = values.get("step"), values.get("totalSteps")
        if isinstance(step, int) and isinstance(total, int) and total > 0:
            self.progress.labels(namespace, name).set(min(1.0, step / total))
        if values.get("kind") == "completed":
            self.progress.labels(namespace, name).set(1.0)
            self.observe_results(namespace, name, values.get("results"))
        speed = values.get("tokensPerSecond")
        if isinstance(speed, (int, float)) and not isinstance(speed, bool):
            # For the dashboard only: reports are the tenant's word; usage counts come from status.usage.
            self.tokens_per_second.labels(namespace, name).set(float(speed))

    def report_accepted(self) -> None:
        self.reports.labels("accepted", "").inc()

    def report_rejected(self, reason: str) -> None:
        self.reports.labels("rejected", reason).inc()

    def reconcile_failed(self, namespace: str, cause: str) -> None:
        self.reconcile_errors.labels(namespace, cause).inc()
