"""Thin kopf handlers: every event about a FineTuneJob or one of its children runs the same reconcile.

Handlers return None (kopf would store return values in status) and write
status explicitly through `client`. kopf's own bookkeeping lives in
annotations under `kubetune.io`. No handler needs a finalizer (children are
removed by owner references, and the periodic resync is `Resync`, not a kopf
timer): so deleting a job, or the CRD after the operator was uninstalled, never
waits for an operator. kopf removes a finalizer (`kubetune.io/finalizer`) that an
older version left, the next time it sees the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import kopf

from kubetune.operator import builders, cache, conditions, metrics, policy, progress, quota, reconcile
from kubetune.operator.client import ChildConflict, KubeClient, api_client
from kubetune.operator.settings import OperatorSettings

Body = dict[str, Any]
log = logging.getLogger(__name__)

SETTINGS = OperatorSettings.from_env()
POLICY = policy.load_policy(SETTINGS.policy_file)
"""The platform policy (quotas, allowed sources and images); read once at start-up (the chart restarts
the operator when it changes)."""
METRICS = metrics.OperatorMetrics()
RESOURCE = (builders.API_GROUP, builders.API_VERSION.split("/")[1], builders.PLURAL)
CHILD_LABELS = {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}


class _Runtime:
    """What the handlers share: the API client, per-job locks, the HTTP server."""

    def __init__(self) -> None:
        self.client: KubeClient | None = None
        self.server: progress.HttpServer | None = None
        self.service: progress.ProgressService | None = None
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._queued: set[tuple[str, str]] = set()
        """Jobs with a reconcile waiting for the job's lock that has not observed the cluster yet."""
        self._child_states: dict[str, tuple[Any, ...]] = {}
        self.settled: set[tuple[str, str]] = set()
        """Finished jobs with nothing pending (`has_pending_work`): their children's events are ignored."""
        """Child uid -> the part of its state reconcile reads, as last seen."""

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def enqueue(self, namespace: str, name: str) -> bool:
        """Claim the job's one queued reconcile; False when one is already waiting (it will observe
        whatever changed, so a second would repeat its work: child events come in bursts)."""
        with self._guard:
            if (namespace, name) in self._queued:
                return False
            self._queued.add((namespace, name))
            return True

    def dequeue(self, namespace: str, name: str) -> None:
        with self._guard:
            self._queued.discard((namespace, name))

    def child_changed(self, body: kopf.Body, event_type: str | None) -> bool:
        """Whether this child event changes anything reconcile reads (first sight and deletion do)."""
        uid = str(body.get("metadata", {}).get("uid") or "")
        state = child_state(body)
        with self._guard:
            if event_type == "DELETED":
                self._child_states.pop(uid, None)
                return True
            if not uid or self._child_states.get(uid) == state:
                return not uid
            self._child_states[uid] = state
            return True

    def kube(self) -> KubeClient:
        if self.client is None:
            self.client = KubeClient(api_client())
        return self.client

    def observed(self, kind: str, body: kopf.Body, event_type: str | None) -> None:
        """A watch event kopf received: into the cache first, so the reconcile it triggers reads it."""
        child_cache = self.kube().cache
        if child_cache is None:
            return
        if event_type == "DELETED":
            child_cache.store.remove(kind, dict(body))
        else:
            child_cache.store.upsert(kind, dict(body))


def child_state(body: kopf.Body) -> tuple[Any, ...]:
    """What reconcile reads from a child Job, pod or Deployment. Most child events change none of
    it (a finalizer removed, a pod-tracking count moved, a resourceVersion bumped): those need no
    reconcile, which would otherwise cost ~10 API requests each."""
    metadata = body.get("metadata", {})
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    containers = tuple(
        (c.get("name"), tuple(sorted((c.get("state") or {}).keys())), c.get("ready"), c.get("restartCount"),
         json.dumps((c.get("state") or {}).get("terminated"), sort_keys=True))
        for c in status.get("containerStatuses") or [])
    found = tuple((c.get("type"), c.get("status"), c.get("reason")) for c in status.get("conditions") or [])
    counts = tuple(status.get(k) for k in ("phase", "active", "succeeded", "failed", "ready", "replicas",
                                          "readyReplicas", "availableReplicas", "updatedReplicas",
                                          "observedGeneration", "completionTime", "startTime"))
    return (metadata.get("deletionTimestamp"), metadata.get("generation"),
            json.dumps(metadata.get("annotations") or {}, sort_keys=True),
            spec.get("suspend"), spec.get("replicas"), counts, found, containers)


RUNTIME = _Runtime()


class Resync:
    """Reconciles every tracked object once per interval, a fallback for missed events.

    Not a kopf timer: kopf puts a finalizer on every object a timer matches, and once the
    operator is uninstalled nobody removes it, so `kubectl delete crd` hangs forever. Which
    objects need polling is tracked from kopf's watch events (`track`), so it costs no requests.
    """

    def __init__(self, reconcile: Callable[[str, str], None], what: str, parallel: int = 8,
                 discover: Callable[[], Iterable[tuple[str, str]]] | None = None,
                 resource: str = "finetunejobs") -> None:
        self.reconcile = reconcile
        self.what = what
        self.resource = resource
        """The `resource` label of its metrics (`kubetune_resync_passes`, `kubetune_resync_undelivered`)."""
        self.parallel = parallel
        self.keys: set[tuple[str, str]] = set()
        self.discover = discover
        """The objects with work pending as the operator's own reads see them, kopf's events or not:
        kopf starts watching a new namespace only once its namespace watch reports it, and a watch it
        is retrying (an API server answering 429 while a resource's storage initialises) delivers
        nothing meanwhile. Without this, such an object waits for kopf; with it, one interval at most."""

    def track(self, namespace: str | None, name: str | None, pending: bool) -> None:
        if namespace and name:
            (self.keys.add if pending else self.keys.discard)((namespace, name))

    async def run_once(self) -> None:
        limit = asyncio.Semaphore(self.parallel)
        keys = set(self.keys)
        if self.discover is not None:
            try:
                keys |= set(await asyncio.to_thread(self.discover))
            except Exception:  # noqa: BLE001 - the tracked keys are still resynced
                log.exception("listing the %sobjects to resync failed", self.what)
        undelivered = keys - self.keys
        if undelivered:
            log.info("resync: %d %sobject(s) kopf has not delivered: %s", len(undelivered), self.what,
                     ", ".join(f"{n}/{m}" for n, m in sorted(undelivered)[:5]))

        async def one(namespace: str, name: str) -> None:
            async with limit:
                try:
                    await asyncio.to_thread(self.reconcile, namespace, name)
                except Exception:
                    log.exception("resync of %s%s/%s failed", self.what, namespace, name)

        await asyncio.gather(*(one(namespace, name) for namespace, name in sorted(keys)))
        METRICS.resync_undelivered.labels(self.resource).inc(len(undelivered))
        METRICS.resync_passes.labels(self.resource).inc()

    async def run_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.run_once()


RESYNCS: list[Resync] = []
"""Started by `configure`; the sweep handlers add theirs."""
_RESYNC_TASKS: list[asyncio.Task[None]] = []


def log_policy_deprecations(platform: policy.PlatformPolicy) -> None:
    """One warning per deprecated use in the platform policy (the operator reads it once, at start-up)."""
    for warning in platform.deprecations:
        log.warning("platform policy: %s", warning)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global SETTINGS
    log_policy_deprecations(POLICY)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=builders.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=builders.API_GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{builders.API_GROUP}/finalizer"
    settings.peering.name = SETTINGS.peering_name
    settings.peering.mandatory = False
    settings.peering.clusterwide = not SETTINGS.namespaces
    # We post our own Events on condition transitions; kopf's per-handler events would be noise.
    settings.posting.enabled = False
    settings.peering.priority = SETTINGS.peering_priority
    settings.peering.lifetime = SETTINGS.peering_lifetime
    settings.execution.max_workers = 8
    # kopf's default retry gaps grow to 21 s (1, 1, 2, …, 13, 21): a watch that met a short outage (an API
    # server answering 429 while a resource's storage initialises) would then deliver nothing for that
    # long after it ended. Short, capped gaps over a similar span (~36 s) before an error escalates.
    settings.networking.error_backoffs = (0.5, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 5)
    kube = RUNTIME.kube()
    if SETTINGS.cache and kube.cache is None:
        kube.cache = kube.build_cache(SETTINGS.namespaces, secret_ttl=SETTINGS.resync_seconds)
        kube.cache.start()
    if not SETTINGS.secret_key and SETTINGS.secret_key_secret:
        key_namespace, _slash, key_name = SETTINGS.secret_key_secret.partition("/")
        key = await asyncio.to_thread(kube.ensure_signing_key, key_namespace, key_name)
        SETTINGS = dataclasses.replace(SETTINGS, secret_key=key)

    async def get_job(namespace: str, name: str) -> Body | None:
        return await asyncio.to_thread(kube.job, namespace, name)

    async def patch_status(namespace: str, name: str, status: Body) -> None:
        await asyncio.to_thread(kube.patch_status, namespace, name, status)

    # Before /metrics answers: the usage counters must start at the stored totals, or the first scrape
    # after a restart would see them drop (a counter reset) and count everything again.
    await asyncio.to_thread(seed_usage_metrics, kube)
    RUNTIME.service = progress.ProgressService(SETTINGS, METRICS, get_job, patch_status)
    RUNTIME.server = progress.HttpServer(RUNTIME.service)
    await RUNTIME.server.start()
    _RESYNC_TASKS.extend(asyncio.create_task(r.run_forever(SETTINGS.resync_seconds)) for r in RESYNCS)


@kopf.on.cleanup()
async def stop_server(**_: Any) -> None:
    for task in _RESYNC_TASKS:
        task.cancel()
    if RUNTIME.client is not None and RUNTIME.client.cache is not None:
        RUNTIME.client.cache.stop()
    if RUNTIME.server is not None:
        await RUNTIME.server.stop()


def seed_usage_metrics(kube: KubeClient) -> None:
    """Load every watched job's stored `status.usage` into the usage counters (one list per watched
    namespace, or one cluster-wide, at start-up only). A failure only delays the counters until
    kopf's resume handlers have reconciled the jobs."""
    try:
        jobs = [j for n in SETTINGS.namespaces for j in kube.list_finetunejobs(n)] if SETTINGS.namespaces \
            else list(kube.list_all_finetunejobs())
    except Exception:  # noqa: BLE001 - start-up must go on
        log.exception("could not list FineTuneJobs to seed the usage counters")
        return
    for job in jobs:
        metadata = job.get("metadata") or {}
        namespace, name = str(metadata.get("namespace", "")), str(metadata.get("name", ""))
        METRICS.observe_usage(namespace, name, POLICY.limits_for(namespace).tenant or namespace,
                              (job.get("status") or {}).get("usage"))


def reconcile_job(namespace: str, name: str) -> None:
    """Observe, decide, converge — for one job; serialised per job, and per namespace when the
    namespace's quota counts running jobs (so two admissions never both take the last place)."""
    counted = POLICY.limits_for(namespace).limits_running_jobs
    if not RUNTIME.enqueue(namespace, name):
        return
    with RUNTIME.lock(namespace, "") if counted else contextlib.nullcontext():
        with RUNTIME.lock(namespace, name):
            RUNTIME.dequeue(namespace, name)  # from here on, a new event needs a new pass
            kube = RUNTIME.kube()
            try:
                try:
                    observed, decision = _converge(kube, namespace, name, counted)
                except ChildConflict:  # the name is read from the API now: observe the conflict
                    observed, decision = _converge(kube, namespace, name, counted)
                if observed is None or decision is None:
                    return
            except Exception:
                METRICS.reconcile_failed(namespace)
                raise
            _update_metrics(observed, decision)
            status = {**(observed.job.get("status") or {}), **decision.status_patch}
            if has_pending_work(observed.job.get("spec"), status):
                RUNTIME.settled.discard((namespace, name))
            else:
                RUNTIME.settled.add((namespace, name))


def _converge(kube: KubeClient, namespace: str, name: str,
              counted: bool) -> tuple[reconcile.Observed | None, reconcile.Decision | None]:
    observed = kube.observe(namespace, name, with_quota=counted)
    if observed is None:
        return None, None
    decision = reconcile.reconcile(observed, SETTINGS, POLICY)
    kube.apply(observed, decision)
    return observed, decision


def admit_waiting_jobs(namespace: str) -> None:
    """Room may have freed up in the namespace: reconcile its waiting jobs, oldest first."""
    if not POLICY.limits_for(namespace).limits_running_jobs:
        return
    kube = RUNTIME.kube()
    usage = quota.namespace_usage(kube.list_finetunejobs(namespace), kube.list_trainer_jobs(namespace))
    for waiting in sorted((u for u in usage if u.waiting), key=lambda u: u.order):
        try:
            reconcile_job(namespace, waiting.name)
        except Exception:
            log.exception("reconcile of waiting job %s/%s failed", namespace, waiting.name)


def _update_metrics(observed: reconcile.Observed, decision: reconcile.Decision) -> None:
    metadata = observed.job["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    status = {**(observed.job.get("status") or {}), **decision.status_patch}
    METRICS.observe_state(namespace, name, reconcile.state_of(status))
    found = list(status.get("conditions") or [])
    METRICS.observe_usage(namespace, name, POLICY.limits_for(namespace).tenant or namespace, status.get("usage"))
    METRICS.observe_results(namespace, name, status.get("results"))
    before = list((observed.job.get("status") or {}).get("conditions") or [])
    finished = conditions.is_true(found, conditions.SUCCEEDED) or conditions.is_true(found, conditions.FAILED)
    # Whether the job serves, from its own condition (the reconcile read the typed spec): ServingDisabled
    # says spec.serving.enabled is false.
    serving_ready = conditions.find(found, conditions.SERVING_READY)
    serving = conditions.is_true(found, conditions.SUCCEEDED) and serving_ready is not None \
        and serving_ready.get("reason") != conditions.SERVING_DISABLED
    METRICS.observe_health(namespace, name, attempts=None if finished else int(status.get("attempts") or 0),
                           stalled=None if finished or conditions.find(found, conditions.STALLED) is None
                           else conditions.is_true(found, conditions.STALLED),
                           serving_ready=conditions.is_true(found, conditions.SERVING_READY) if serving else None)
    if status.get("startTime") and not (observed.job.get("status") or {}).get("startTime"):
        created = _time(metadata.get("creationTimestamp"))
        started = _time(status.get("startTime"))
        if created is not None and started is not None:
            METRICS.observe_queue_wait(namespace, (started - created).total_seconds())
    for outcome in (conditions.SUCCEEDED, conditions.FAILED):
        if conditions.is_true(found, outcome) and not conditions.is_true(before, outcome):
            start = _time(status.get("startTime")) or _time(metadata.get("creationTimestamp"))
            end = _time(status.get("completionTime"))
            if start is not None and end is not None:
                METRICS.observe_finished(namespace, outcome, (end - start).total_seconds())


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def reconcile_or_retry(reconcile: Callable[[str, str], None], namespace: str | None, name: str | None,
                       what: str = "") -> None:
    """Run one object's reconcile; on any error log it and let kopf retry in 10 s."""
    if not namespace or not name:
        return
    try:
        reconcile(namespace, name)
    except Exception as error:
        log.exception("reconcile of %s%s/%s failed", what, namespace, name)
        raise kopf.TemporaryError(f"{what}reconcile failed: {error}", delay=10) from error


def _reconcile_or_retry(namespace: str | None, name: str | None) -> None:
    reconcile_or_retry(reconcile_job, namespace, name)


@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
@kopf.on.resume(*RESOURCE)
def on_job_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    _reconcile_or_retry(namespace, name)


def has_pending_work(spec: Any, status: Any) -> bool:
    """Unfinished jobs have work left, and finished ones that still keep something (serving
    children, a ttlSecondsAfterFinished clock); a finished job without either has nothing to
    converge: neither the timer nor its old Jobs' and pods' events need to reconcile it."""
    found = list((status or {}).get("conditions") or [])
    if not (conditions.is_true(found, conditions.SUCCEEDED) or conditions.is_true(found, conditions.FAILED)):
        return True
    serving = (spec or {}).get("serving") or {}
    return bool(serving.get("enabled")) or (spec or {}).get("ttlSecondsAfterFinished") is not None


def working_alone() -> bool:
    """Whether kopf cannot pause this replica: its peering object is absent (the chart creates one only
    for hot standbys). Only then may a resync act on objects kopf has not delivered: a paused standby's
    kopf delivers nothing, and so it must do nothing."""
    return not RUNTIME.kube().peering_in_use(SETTINGS.peering_name, SETTINGS.namespaces)


def pending_jobs() -> list[tuple[str, str]]:
    """Every FineTuneJob in the watched namespaces with work pending, from the informers' memory (no
    request); nothing before they have listed once, without them (`KUBETUNE_CACHE=false`), or when
    other replicas may hold the lead (`working_alone`)."""
    kube = RUNTIME.kube()
    if kube.cache is None or not kube.cache.wait_synced(0) or not working_alone():
        return []
    found = []
    for body in kube.cache.store.every(cache.FINETUNEJOB):
        metadata = body.get("metadata") or {}
        if has_pending_work(body.get("spec"), body.get("status")):
            found.append((str(metadata.get("namespace") or ""), str(metadata.get("name") or "")))
    return found


JOB_RESYNC = Resync(reconcile_job, "", discover=pending_jobs)
RESYNCS.append(JOB_RESYNC)


@kopf.on.event(*RESOURCE)
def track_job(namespace: str | None, name: str | None, spec: kopf.Spec, status: kopf.Status, body: kopf.Body,
              type: str | None = None, **_: Any) -> None:
    """Polling a job with nothing pending would cost ~10 requests per job per interval forever."""
    RUNTIME.observed(cache.FINETUNEJOB, body, type)
    JOB_RESYNC.track(namespace, name, type != "DELETED" and has_pending_work(dict(spec), dict(status)))


@kopf.on.delete(*RESOURCE, optional=True)
def on_job_deleted(namespace: str | None, name: str | None, uid: str | None, **_: Any) -> None:
    """Children go with the job (owner references); only the operator's memory needs clearing."""
    if namespace and name:
        METRICS.forget_job(namespace, name)
        RUNTIME.settled.discard((namespace, name))
    if uid and RUNTIME.service is not None:
        RUNTIME.service.forget(uid)
    if namespace:
        admit_waiting_jobs(namespace)


def _owner_name(body: kopf.Body) -> str | None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == builders.KIND and owner.get("apiVersion") == builders.API_VERSION:
            return str(owner.get("name"))
    labels = body.get("metadata", {}).get("labels") or {}
    instance = labels.get(builders.LABEL_INSTANCE)
    return str(instance) if instance else None


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
def on_child_event(namespace: str | None, body: kopf.Body, type: str | None = None, **_: Any) -> None:
    """A child changed (a pod started or ended, a Job finished, serving became available):
    converge its FineTuneJob now; when a trainer Job stops holding quota, start waiting jobs."""
    RUNTIME.observed(str(body.get("kind") or ""), body, type)
    name = _owner_name(body)
    settled = (namespace, name) in RUNTIME.settled and body.get("kind") != "Deployment"
    if namespace and name and not settled and RUNTIME.child_changed(body, type):
        try:
            reconcile_job(namespace, name)
        except Exception:  # event handlers are not retried; the timer converges later
            log.exception("reconcile of %s/%s after a child event failed", namespace, name)
    if namespace and _frees_quota(body, type):
        try:
            admit_waiting_jobs(namespace)
        except Exception:
            log.exception("admitting waiting jobs in %s failed", namespace)


def _frees_quota(body: kopf.Body, event_type: str | None) -> bool:
    """A trainer Job that finished, was suspended or was deleted no longer holds its quota share."""
    if body.get("kind") != "Job":
        return False
    if (body.get("metadata", {}).get("labels") or {}).get(builders.LABEL_COMPONENT) != builders.COMPONENT_TRAINER:
        return False
    if event_type == "DELETED" or body.get("spec", {}).get("suspend"):
        return True
    return quota.trainer_finished(dict(body))
