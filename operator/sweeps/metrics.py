"""Prometheus series of FineTuneSweeps, registered in the operator's registry (served at `/metrics`).

- `kubetune_sweep_trials{namespace,sweep,state}`: a sweep's trials by state
  (Pending, Running, Succeeded, Failed, Stopped, Pruned);
- `kubetune_sweep_best_objective{namespace,sweep,metric}`: the best trial's objective value;
- `kubetune_sweep_reconciles_total{namespace,sweep}`: finished reconciles of a sweep (that the
  operator looked at it, even when nothing changed: tests wait for it before asserting that
  nothing happened).

Pure apart from prometheus-client: `sweep_handlers` feeds it each sweep's status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

TRIAL_STATES: Final = ("Pending", "Running", "Succeeded", "Failed", "Stopped", "Pruned")


class SweepMetrics:
    """The sweep series, in a given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.trials = Gauge("kubetune_sweep_trials", "Trials of a FineTuneSweep by state",
                            ["namespace", "sweep", "state"], registry=registry)
        self.best = Gauge("kubetune_sweep_best_objective", "Objective value of a FineTuneSweep's best trial",
                          ["namespace", "sweep", "metric"], registry=registry)
        self.reconciles = Counter("kubetune_sweep_reconciles", "Finished reconciles of a FineTuneSweep",
                                  ["namespace", "sweep"], registry=registry)
        self._metric_of: dict[tuple[str, str], str] = {}

    def observe(self, namespace: str, sweep: str, status: Mapping[str, Any]) -> None:
        """Set the series of one sweep from its (new) status."""
        counts = status.get("counts") or {}
        for state in TRIAL_STATES:
            self.trials.labels(namespace, sweep, state).set(int(counts.get(state.lower()) or 0))
        best = (status.get("bestTrial") or {}).get("objective")
        metric = str(status.get("objectiveMetric") or "")
        if isinstance(best, (int, float)) and metric:
            self.best.labels(namespace, sweep, metric).set(float(best))
            self._metric_of[(namespace, sweep)] = metric
        self.reconciles.labels(namespace, sweep).inc()

    def forget(self, namespace: str, sweep: str) -> None:
        """Remove a deleted sweep's series."""
        for state in TRIAL_STATES:
            try:
                self.trials.remove(namespace, sweep, state)
            except KeyError:
                pass
        try:
            self.reconciles.remove(namespace, sweep)
        except KeyError:
            pass
        metric = self._metric_of.pop((namespace, sweep), None)
        if metric is not None:
            try:
                self.best.remove(namespace, sweep, metric)
            except KeyError:
                pass
