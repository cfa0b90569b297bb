"""Thin kopf handlers for FineTuneSweeps: every event about a sweep or one of its trials runs the same
level-based reconcile (`sweep.decide`), serialised per sweep.

They share the operator's runtime with the FineTuneJob controller
(`runtime.RUNTIME`: API client, settings, the metrics registry served at
`/metrics`, the resyncs); kopf's settings are set once, by the FineTuneJob
controller's start-up handler. Handlers return None and
write status explicitly.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.operator.runtime import RUNTIME, Resync, reconcile_or_retry
from kubetune.operator.sweeps import metrics as sweep_metrics
from kubetune.operator.sweeps import models as sweep_models
from kubetune.operator.sweeps import reconcile as sweep
from kubetune.operator.sweeps import study as sweep_study
from kubetune.operator.sweeps.client import SweepClient

log = logging.getLogger(__name__)

SWEEP_RESOURCE = (sweep_models.GROUP, sweep_models.VERSION, sweep_models.PLURAL)
_METRICS: list[sweep_metrics.SweepMetrics] = []


def sweep_metrics_() -> sweep_metrics.SweepMetrics:
    """The sweep metrics, registered on first use in the registry the operator serves at `/metrics`."""
    if not _METRICS:
        _METRICS.append(sweep_metrics.SweepMetrics(RUNTIME.metrics.registry))
    return _METRICS[0]


STUDIES = sweep_study.StudyCache()
"""Replayed Optuna studies between reconciles (a speed-up: a restart replays the stored log instead)."""
_LOCK_PREFIX = "sweep:"
"""Per-sweep locks live in the shared runtime's lock table, under names no FineTuneJob can have."""


def reconcile_sweep(namespace: str, name: str) -> None:
    """Observe the sweep and its trials, decide, carry out — for one sweep at a time."""
    with RUNTIME.lock(namespace, _LOCK_PREFIX + name):
        client = SweepClient(RUNTIME.kube())
        body = client.get_sweep(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # deleted: the garbage collector removes the trials
        decision = sweep.decide(body, client.list_trials(body), studies=STUDIES)
        client.apply(body, decision)
        sweep_metrics_().observe(namespace, name, {**(body.get("status") or {}), **decision.status})


def _reconcile_or_retry(namespace: str | None, name: str | None) -> None:
    reconcile_or_retry(reconcile_sweep, namespace, name, what="sweep ")


@kopf.on.create(*SWEEP_RESOURCE)
@kopf.on.update(*SWEEP_RESOURCE)
@kopf.on.resume(*SWEEP_RESOURCE)
def on_sweep_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    _reconcile_or_retry(namespace, name)


def all_sweeps() -> list[tuple[str, str]]:
    """Every sweep in the watched namespaces (one list request per resync interval); none when other
    replicas may hold the lead (`Runtime.working_alone`)."""
    if not RUNTIME.working_alone():
        return []
    return SweepClient(RUNTIME.kube()).sweep_names(RUNTIME.settings.namespaces)


SWEEP_RESYNC = Resync(reconcile_sweep, "sweep ", discover=all_sweeps, resource="finetunesweeps")
RUNTIME.resyncs.append(SWEEP_RESYNC)


@kopf.on.event(*SWEEP_RESOURCE)
def track_sweep(namespace: str | None, name: str | None, type: str | None = None, **_: Any) -> None:
    """Every sweep is resynced (no kopf timer: it would put a finalizer on each sweep)."""
    SWEEP_RESYNC.track(namespace, name, type != "DELETED")


@kopf.on.delete(*SWEEP_RESOURCE, optional=True)
def on_sweep_deleted(namespace: str | None, name: str | None, body: kopf.Body, **_: Any) -> None:
    """Trials go with the sweep (owner references); only the metrics need clearing."""
    if namespace and name:
        sweep_metrics_().forget(namespace, name)
    uid = (body.get("metadata") or {}).get("uid")
    if uid:
        STUDIES.forget(str(uid))


def _sweep_of(body: kopf.Body) -> str | None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == sweep_models.KIND and owner.get("apiVersion") == sweep.API_VERSION:
            return str(owner.get("name"))
    return None


@kopf.on.event(sweep_models.GROUP, sweep_models.VERSION, "finetunejobs", labels={sweep.LABEL_SWEEP: kopf.PRESENT})
def on_trial_event(namespace: str | None, body: kopf.Body, **_: Any) -> None:
    """A trial changed (progress, an outcome, deletion): converge its sweep now."""
    name = _sweep_of(body)
    if namespace and name:
        try:
            reconcile_sweep(namespace, name)
        except Exception:  # event handlers are not retried; the timer converges later
            log.exception("reconcile of sweep %s/%s after a trial event failed", namespace, name)
