"""Prometheus metrics of the operator, in a registry of their own.

Series (all prefixed `kubetune_`):

- `jobs{namespace,state}`: FineTuneJobs by state (Validating, Pending, Running, Suspended, Succeeded, Failed);
- `job_duration_seconds{namespace,outcome}`: histogram of start-to-completion time of finished jobs;
- `job_train_loss`, `job_validation_loss`, `job_progress_ratio{namespace,name}`: latest values per job;
- `job_test_metric{namespace,name,model,metric}`: the test-split results of the fine-tuned model
  (`model="tuned"`) and of the base model (`model="base"`): loss, perplexity, tokenAccuracy, and
  accuracy/precision/recall/f1 for classification;
- `job_improvement{namespace,name,metric}`: tuned against base (`status.results.improvement`);
- `tokens_processed_total{namespace}`: training tokens seen, summed over jobs;
- `gpu_seconds_total{namespace}`: GPU-seconds held by running trainer pods (chargeback);
- `reconcile_errors_total{namespace}`: reconciles that raised;
- `progress_reports_total{result,reason}`: reports accepted / rejected (by reason).

`OperatorMetrics` keeps the bookkeeping that turns observations into these
series (a job counted once per state, tokens counted once, GPU time accrued
between observations); it is pure apart from prometheus-client.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600, 24 * 3600, 72 * 3600)
"""Fine-tuning runs last minutes to days."""


TEST_METRICS = ("loss", "perplexity", "tokenAccuracy", "accuracy", "precision", "recall", "f1")
"""The test-split metrics exported per model (base and tuned)."""


@dataclasses.dataclass
class _GpuClock:
    gpus: int
    since: float


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
        self.tokens = Counter("kubetune_tokens_processed", "Training tokens processed",
                              ["namespace"], registry=self.registry)
        self.gpu_seconds = Counter("kubetune_gpu_seconds", "GPU-seconds held by running trainer pods",
                                   ["namespace"], registry=self.registry)
        self.reconcile_errors = Counter("kubetune_reconcile_errors", "Reconciles that raised an error",
                                        ["namespace"], registry=self.registry)
        self.reports = Counter("kubetune_progress_reports", "Progress reports by result",
                               ["result", "reason"], registry=self.registry)
        self.test_metric = Gauge("kubetune_job_test_metric",
                                 "Test-split metric of a job's fine-tuned (model=tuned) or base (model=base) model",
                                 ["namespace", "name", "model", "metric"], registry=self.registry)
        self.improvement = Gauge("kubetune_job_improvement",
                                 "Fine-tuned against base model on the test split: perplexityDrop (relative), "
                                 "lossDrop (nats), *Gain (percentage points)",
                                 ["namespace", "name", "metric"], registry=self.registry)
        self._result_series: dict[tuple[str, str], set[tuple[str, ...]]] = {}
        self._states: dict[tuple[str, str], str] = {}
        self._tokens_seen: dict[tuple[str, str, int], int] = {}
        self._gpu_clocks: dict[tuple[str, str], _GpuClock] = {}

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
        for gauge in (self.train_loss, self.val_loss, self.progress):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        self._gpu_clocks.pop((namespace, name), None)
        for labels in self._result_series.pop((namespace, name), set()):
            gauge = self.test_metric if len(labels) == 2 else self.improvement
            try:
                gauge.remove(namespace, name, *labels)
            except KeyError:
                pass
        for key in [k for k in self._tokens_seen if k[:2] == (namespace, name)]:
            del self._tokens_seen[key]

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

    # -- GPU time ------------------------------------------------------------------

    def observe_gpus(self, namespace: str, name: str, gpus: int, now: float) -> None:
        """The job holds `gpus` GPUs at `now` (0 = none): accrue GPU-seconds since the last observation."""
        key = (namespace, name)
        clock = self._gpu_clocks.get(key)
        if clock is not None and clock.gpus > 0 and now > clock.since:
            self.gpu_seconds.labels(namespace).inc(clock.gpus * (now - clock.since))
        if gpus > 0:
            self._gpu_clocks[key] = _GpuClock(gpus=gpus, since=now)
        else:
            self._gpu_clocks.pop(key, None)

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
        tokens = values.get("tokensSeen")
        if isinstance(tokens, int):
            # tokensSeen is cumulative within an attempt (a resumed attempt continues the count);
            # count only growth, so a repeated value adds nothing.
            key = (namespace, name, attempt)
            before = max([v for k, v in self._tokens_seen.items() if k[:2] == (namespace, name)
                          and k[2] <= attempt] or [0])
            if tokens > before:
                self.tokens.labels(namespace).inc(tokens - before)
            self._tokens_seen[key] = max(tokens, self._tokens_seen.get(key, 0))

    def report_accepted(self) -> None:
        self.reports.labels("accepted", "").inc()

    def report_rejected(self, reason: str) -> None:
        self.reports.labels("rejected", reason).inc()

    def reconcile_failed(self, namespace: str) -> None:
        self.reconcile_errors.labels(namespace).inc()
