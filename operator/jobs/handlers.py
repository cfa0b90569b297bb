"""Thin handlers: every event about a FineTuneJob (kopf's) or one of its children (the operator's own
informers', `child_event`) runs the same reconcile.

Handlers return None (kopf would store return values in status) and write
status explicitly through `client`. kopf writes nothing on a FineTuneJob: its
only handler of them is an event handler (`on_job_event`), which keeps no
diff-base or progress annotations. No handler needs a finalizer (children are
removed by owner references, and the periodic resync is `Resync`, not a kopf
timer): so deleting a job, or the CRD after the operator was uninstalled, never
waits for an operator. kopf removes a finalizer (`kubetune.io/finalizer`) that an
older version left, the next time it sees the object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import kopf

from kubetune.operator import cache, conditions
from kubetune.operator.client import ChildConflict, KubeClient, error_cause
from kubetune.operator.jobs import builders, reconcile
from kubetune.operator.platform import policy, quota
from kubetune.operator.progress import server as progress
from kubetune.operator.runtime import RUNTIME, DeliveryWatch, Resync
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.specs import has_pending_work

Body = dict[str, Any]
log = logging.getLogger(__name__)

RESOURCE = (builders.API_GROUP, builders.API_VERSION.split("/")[1], builders.PLURAL)


class _JobEvents:
    """The FineTuneJob controller's memory of events: queued reconciles, children's last states, and
    finished jobs with nothing pending."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._queued: set[tuple[str, str]] = set()
        """Jobs with a reconcile waiting for the job's lock that has not observed the cluster yet."""
        self._child_states: dict[str, tuple[Any, ...]] = {}
        """Child uid -> the part of its state reconcile reads, as last seen."""
        self._job_states: dict[str, int] = {}
        """FineTuneJob uid -> a hash of what `job_changed` compares, as last seen."""
        self.settled: set[tuple[str, str]] = set()
        """Finished jobs with nothing pending (`has_pending_work`): their children's events are ignored."""

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

    def child_changed(self, body: Mapping[str, Any], event_type: str | None) -> bool:
        """Whether this child event changes anything reconcile reads (first sight and deletion do)."""
        uid = str(body.get("metadata", {}).get("uid") or "")
        return self._changed(self._child_states, uid, child_state(body), event_type, deleted=True)

    def job_changed(self, body: Mapping[str, Any], event_type: str | None) -> bool:
        """Whether a FineTuneJob event asks for a reconcile: the job's first sight in this process (an
        event at start-up, a new job), or a change of what a user or a sweep writes — spec
        (`generation`), labels, annotations, deletion. The operator's own status writes come back as
        events too; they change none of it (kopf's diff-base on the spec and metadata did this before,
        at the cost of a patch per job to store it)."""
        metadata = body.get("metadata") or {}
        annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if k != cache.KOPF_DIFFBASE_ANNOTATION}
        state = hash((metadata.get("generation"), metadata.get("deletionTimestamp"),
                      json.dumps(metadata.get("labels") or {}, sort_keys=True), json.dumps(annotations, sort_keys=True)))
        return self._changed(self._job_states, str(metadata.get("uid") or ""), state, event_type, deleted=False)

    def knows(self, uid: str | None) -> bool:
        """Whether this process has seen the FineTuneJob `uid` (and not its deletion)."""
        with self._guard:
            return bool(uid) and uid in self._job_states

    def _changed(self, seen: dict[str, Any], uid: str, state: Any, event_type: str | None, deleted: bool) -> bool:
        """Remember `state` as the object's last; whether it differs from the one before (always for an
        object without a uid). A deletion forgets the object and answers `deleted`."""
        with self._guard:
            if event_type == "DELETED":
                seen.pop(uid, None)
                return deleted
            if not uid or seen.get(uid) == state:
                return not uid
            seen[uid] = state
            return True

    @staticmethod
    def observed(kind: str, body: kopf.Body, event_type: str | None) -> None:
        """A watch event kopf received: into the cache first, so the reconcile it triggers reads it."""
        JOB_DELIVERY.kopf_delivered(kind, str(body.get("metadata", {}).get("namespace") or ""))
        child_cache = RUNTIME.kube().cache
        if child_cache is None:
            return
        if event_type == "DELETED":
            child_cache.store.remove(kind, dict(body))
        else:
            child_cache.store.upsert(kind, dict(body))


def child_state(body: Mapping[str, Any]) -> tuple[Any, ...]:
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


EVENTS = _JobEvents()


_RESYNC_TASKS: list[asyncio.Task[None]] = []


def log_policy_deprecations(platform: policy.PlatformPolicy) -> None:
    """One warning per deprecated use in the platform policy (the operator reads it once, at start-up)."""
    for warning in platform.deprecations:
        log.warning("platform policy: %s", warning)


LIST_CHUNK = 200
"""Objects per page of kopf's initial listings (its `watching.chunk_size`; kopf's default: all at once)."""


def bound_kopf_memory(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    """kopf's settings that bound its memory by the objects in work, not by all there are (a start
    among thousands of jobs).

    - At most `worker_limit` per-object workers at once; a worker whose object has gone quiet frees
      its place after 0.5 s instead of kopf's 5 s.
    - The initial listing in pages of `LIST_CHUNK`: kopf decodes one page at a time and feeds its
      workers from it, where a listing in one piece holds every job's decoded body until the last
      was handled. Python's allocator keeps the arenas such a peak spread over for good (the
      long-lived objects made meanwhile pin them): with 5,000 finished jobs that peak stayed
      resident (`bench/operator_scale.py --finished`, docs/operator.md "Memory").
    """
    settings.queueing.worker_limit = operator.worker_limit or None
    settings.queueing.idle_timeout = 0.5
    settings.watching.chunk_size = LIST_CHUNK


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    log_policy_deprecations(RUNTIME.policy)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=builders.API_GROUP)
    diffbase_prefix, _slash, diffbase_key = cache.KOPF_DIFFBASE_ANNOTATION.partition("/")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=diffbase_prefix, key=diffbase_key)
    settings.persistence.finalizer = f"{builders.API_GROUP}/finalizer"
    settings.peering.name = RUNTIME.settings.peering_name
    settings.peering.mandatory = False
    settings.peering.clusterwide = not RUNTIME.settings.namespaces
    # We post our own Events on condition transitions; kopf's per-handler events would be noise.
    settings.posting.enabled = False
    settings.peering.priority = RUNTIME.settings.peering_priority
    settings.peering.lifetime = RUNTIME.settings.peering_lifetime
    settings.execution.max_workers = RUNTIME.settings.reconcile_threads
    bound_kopf_memory(settings, RUNTIME.settings)
    # kopf's default retry gaps grow to 21 s (1, 1, 2, …, 13, 21): a watch that met a short outage (an API
    # server answering 429 while a resource's storage initialises) would then deliver nothing for that
    # long after it ended. Short, capped gaps over a similar span (~36 s) before an error escalates.
    settings.networking.error_backoffs = (0.5, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 5)
    kube = RUNTIME.kube()
    if kube.cache is None:
        # The informers are the one watch of the children (their events drive `child_event`), with or
        # without reads from memory (`KUBETUNE_CACHE=false` reads the API server every pass).
        kube.cache = kube.build_cache(RUNTIME.settings.namespaces, secret_ttl=RUNTIME.settings.resync_seconds)
        kube.reads_cache = RUNTIME.settings.cache
        kube.cache.on_event(DELIVERY_KINDS, JOB_DELIVERY.seen)
        kube.cache.on_event(CHILD_KINDS, child_event)
        kube.cache.start()
    if not RUNTIME.settings.secret_key and RUNTIME.settings.secret_key_secret:
        key_namespace, _slash, key_name = RUNTIME.settings.secret_key_secret.partition("/")
        key = await asyncio.to_thread(kube.ensure_signing_key, key_namespace, key_name)
        RUNTIME.settings = dataclasses.replace(RUNTIME.settings, secret_key=key)

    async def get_job(namespace: str, name: str) -> Body | None:
        return await asyncio.to_thread(kube.job, namespace, name)

    async def patch_status(namespace: str, name: str, status: Body) -> None:
        await asyncio.to_thread(kube.patch_status, namespace, name, status)

    # Before /metrics answers: the usage counters must start at the stored totals, or the first scrape
    # after a restart would see them drop (a counter reset) and count everything again.
    await asyncio.to_thread(seed_usage_metrics, kube)
    RUNTIME.service = progress.ProgressService(RUNTIME.settings, RUNTIME.metrics, get_job, patch_status)
    RUNTIME.server = progress.HttpServer(RUNTIME.service)
    await RUNTIME.server.start()
    _RESYNC_TASKS.extend(asyncio.create_task(r.run_forever(RUNTIME.settings.resync_seconds)) for r in RUNTIME.resyncs)


@kopf.on.cleanup()
async def stop_server(**_: Any) -> None:
    for task in _RESYNC_TASKS:
        task.cancel()
    REACTIONS.stop()
    if RUNTIME.client is not None and RUNTIME.client.cache is not None:
        RUNTIME.client.cache.stop()
    if RUNTIME.client is not None:  # the Events still queued (posted in the background)
        await asyncio.to_thread(RUNTIME.client.event_poster.flush, 5.0)
    if RUNTIME.server is not None:
        await RUNTIME.server.stop()


def seed_usage_metrics(kube: KubeClient) -> None:
    """Load every watched job's stored `status.usage` into the usage counters (at start-up only: a
    paged listing per watched namespace, or cluster-wide for patterns). A failure only delays the
    counters until the start-up passes have reconciled the jobs."""
    try:
        for job in kube.each_finetunejob(RUNTIME.settings.namespaces):
            metadata = job.get("metadata") or {}
            namespace, name = str(metadata.get("namespace", "")), str(metadata.get("name", ""))
            RUNTIME.metrics.observe_usage(namespace, name, RUNTIME.policy.limits_for(namespace).tenant or namespace,
                                          (job.get("status") or {}).get("usage"))
    except Exception:  # noqa: BLE001 - start-up must go on
        log.exception("could not list FineTuneJobs to seed the usage counters")


def reconcile_job(namespace: str, name: str) -> None:
    """Observe, decide, converge — for one job; serialised per job, and per namespace when the
    namespace's quota counts running jobs (so two admissions never both take the last place)."""
    counted = RUNTIME.policy.limits_for(namespace).limits_running_jobs
    if not EVENTS.enqueue(namespace, name):
        return
    with RUNTIME.lock(namespace, "") if counted else contextlib.nullcontext():
        with RUNTIME.lock(namespace, name):
            EVENTS.dequeue(namespace, name)  # from here on, a new event needs a new pass
            kube = RUNTIME.kube()
            try:
                try:
                    observed, decision = _converge(kube, namespace, name, counted)
                except ChildConflict:  # the name is read from the API now: observe the conflict
                    observed, decision = _converge(kube, namespace, name, counted)
                if observed is None or decision is None:
                    return
            except Exception as error:
                RUNTIME.metrics.reconcile_failed(namespace, error_cause(error))
                raise
            _update_metrics(observed, decision)
            status = {**(observed.job.get("status") or {}), **decision.status_patch}
            if has_pending_work(observed.job.get("spec"), status):
                EVENTS.settled.discard((namespace, name))
            else:
                EVENTS.settled.add((namespace, name))


def _converge(kube: KubeClient, namespace: str, name: str,
              counted: bool) -> tuple[reconcile.Observed | None, reconcile.Decision | None]:
    observed = kube.observe(namespace, name, with_quota=counted)
    if observed is None:
        return None, None
    decision = reconcile.reconcile(observed, RUNTIME.settings, RUNTIME.policy)
    kube.apply(observed, decision)
    return observed, decision


def admit_waiting_jobs(namespace: str) -> None:
    """Room may have freed up in the namespace: reconcile its waiting jobs, oldest first."""
    if not RUNTIME.policy.limits_for(namespace).limits_running_jobs:
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
    RUNTIME.metrics.observe_state(namespace, name, reconcile.state_of(status))
    found = list(status.get("conditions") or [])
    RUNTIME.metrics.observe_usage(namespace, name, RUNTIME.policy.limits_for(namespace).tenant or namespace, status.get("usage"))
    RUNTIME.metrics.observe_results(namespace, name, status.get("results"))
    before = list((observed.job.get("status") or {}).get("conditions") or [])
    finished = conditions.is_true(found, conditions.SUCCEEDED) or conditions.is_true(found, conditions.FAILED)
    # Whether the job serves, from its own condition (the reconcile read the typed spec): ServingDisabled
    # says spec.serving.enabled is false.
    serving_ready = conditions.find(found, conditions.SERVING_READY)
    serving = conditions.is_true(found, conditions.SUCCEEDED) and serving_ready is not None \
        and serving_ready.get("reason") != conditions.SERVING_DISABLED
    RUNTIME.metrics.observe_health(namespace, name, attempts=None if finished else int(status.get("attempts") or 0),
                           stalled=None if finished or conditions.find(found, conditions.STALLED) is None
                           else conditions.is_true(found, conditions.STALLED),
                           serving_ready=conditions.is_true(found, conditions.SERVING_READY) if serving else None)
    if status.get("startTime") and not (observed.job.get("status") or {}).get("startTime"):
        created = _time(metadata.get("creationTimestamp"))
        started = _time(status.get("startTime"))
        if created is not None and started is not None:
            RUNTIME.metrics.observe_queue_wait(namespace, (started - created).total_seconds())
    for outcome in (conditions.SUCCEEDED, conditions.FAILED):
        if conditions.is_true(found, outcome) and not conditions.is_true(before, outcome):
            start = _time(status.get("startTime")) or _time(metadata.get("creationTimestamp"))
            end = _time(status.get("completionTime"))
            if start is not None and end is not None:
                RUNTIME.metrics.observe_finished(namespace, outcome, (end - start).total_seconds())


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


RETRY_SECONDS = 10.0
"""A failed reconcile runs again this long after (kopf's `TemporaryError` delay before)."""


def schedule_reconcile(namespace: str, name: str) -> None:
    """Reconcile the job on the reaction pool, after any reconcile of it already waiting; a failure is
    logged and retried `RETRY_SECONDS` later (the resync also converges it)."""
    REACTIONS.submit(("reconcile of", namespace, name), functools.partial(reconcile_job, namespace, name),
                     retry_after=RETRY_SECONDS)


def pending_jobs() -> list[tuple[str, str]]:
    """Every FineTuneJob in the watched namespaces with work pending, from the informers' memory (no
    request); nothing before they have listed once, without them (`KUBETUNE_CACHE=false`), or when
    other replicas may hold the lead (`working_alone`)."""
    kube = RUNTIME.kube()
    if kube.cache is None or not kube.cache.wait_synced(0) or not RUNTIME.working_alone():
        return []
    found = []
    for body in kube.cache.store.every(cache.FINETUNEJOB):
        metadata = body.get("metadata") or {}
        if has_pending_work(body.get("spec"), body.get("status")):
            found.append((str(metadata.get("namespace") or ""), str(metadata.get("name") or "")))
    return found


JOB_RESYNC = Resync(reconcile_job, "", discover=pending_jobs)
RUNTIME.resyncs.append(JOB_RESYNC)


DELIVERY_KINDS = (cache.FINETUNEJOB,)
"""The kinds whose events kopf's handlers act on, checked by the `DeliveryWatch`."""
CHILD_KINDS = (cache.JOB, cache.POD, cache.DEPLOYMENT)
"""The children whose changes the operator acts on (`child_event`); ConfigMaps and Services only feed
the cache."""
_ALONE_TTL = 10.0
_alone: list[float | bool] = [float("-inf"), False]
"""When `working_alone` was last asked, and its answer: undelivered events can come in bursts."""


def _working_alone() -> bool:
    if time.monotonic() - float(_alone[0]) > _ALONE_TTL:
        _alone[:] = [time.monotonic(), RUNTIME.working_alone()]
    return bool(_alone[1])


def _undelivered(kind: str, namespace: str, name: str, event_type: str) -> None:
    """What kopf's handler would have done for an event it has not delivered (`DeliveryWatch`)."""
    if not _working_alone():
        return
    kube = RUNTIME.kube()
    body = kube.cache.store.get(kind, namespace, name) if kube.cache is not None else None
    if event_type == "DELETED" or body is None or not has_pending_work(body.get("spec"), body.get("status")):
        return
    log.info("FineTuneJob %s/%s: kopf has delivered nothing from %s for a while; reconciling it", namespace,
             name, namespace)
    RUNTIME.metrics.resync_undelivered.labels(JOB_RESYNC.resource).inc()
    reconcile_job(namespace, name)


JOB_DELIVERY = DeliveryWatch(_undelivered)


@kopf.on.event(*RESOURCE)
def on_job_event(namespace: str | None, name: str | None, uid: str | None, spec: kopf.Spec, status: kopf.Status,
                 body: kopf.Body, type: str | None = None, **_: Any) -> None:  # noqa: A002 - kopf's name
    """Every FineTuneJob event, the start-up listing's included: reconcile when the job is new to this
    process or its spec or metadata changed (`job_changed`), on the reaction pool, except a job first
    seen `settled` (finished, nothing pending, converged for its spec: only its metrics are taken);
    remember which jobs the resync polls (one with nothing pending would cost ~10 requests per
    interval forever).

    The only kopf handler of FineTuneJobs: kopf's create/update/resume/delete handlers would make it
    store its diff-base (a copy of the spec) and handler progress in annotations, a patch of every new
    job (checked by the API server's schema and CEL rules like any spec write) and a larger object in
    every later write and watch event."""
    EVENTS.observed(cache.FINETUNEJOB, body, type)
    pending = has_pending_work(dict(spec), dict(status))
    JOB_RESYNC.track(namespace, name, type != "DELETED" and pending)
    if not namespace or not name:
        return
    if type == "DELETED":
        job_deleted(namespace, name, uid)
    else:
        first_sight = not EVENTS.knows(uid)
        if not EVENTS.job_changed(body, type):
            return
        if first_sight and not pending and settled(body):
            note_settled(namespace, name, body)
        else:
            schedule_reconcile(namespace, name)


def settled(body: Mapping[str, Any]) -> bool:
    """Whether a finished job with nothing pending (`has_pending_work`) was converged for its current
    spec: its status answers its generation (the last pass wrote it after its actions), and it is not
    being deleted. Such a job needs no pass when first seen: thousands of them at start-up made as
    many passes, which took ~100 s (new jobs waited behind them) and left their garbage resident."""
    metadata = body.get("metadata") or {}
    observed_generation = (body.get("status") or {}).get("observedGeneration")
    return not metadata.get("deletionTimestamp") and observed_generation is not None \
        and observed_generation == metadata.get("generation")


def note_settled(namespace: str, name: str, body: Mapping[str, Any]) -> None:
    """What a pass would have left of a settled job: its metrics from its stored status, and its old
    children's events ignored (`child_event`)."""
    EVENTS.settled.add((namespace, name))
    nothing = reconcile.Decision(status_patch={}, actions=(), events=())
    _update_metrics(reconcile.Observed(job=dict(body), now=datetime.now(timezone.utc)), nothing)


def job_deleted(namespace: str, name: str, uid: str | None) -> None:
    """Children go with the job (owner references); only the operator's memory needs clearing, and its
    quota share may let a waiting job start."""
    RUNTIME.metrics.forget_job(namespace, name)
    EVENTS.settled.discard((namespace, name))
    if uid and RUNTIME.service is not None:
        RUNTIME.service.forget(uid)
    REACTIONS.submit(("admitting waiting jobs in", namespace), functools.partial(admit_waiting_jobs, namespace))


def _owner_name(body: Mapping[str, Any]) -> str | None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == builders.KIND and owner.get("apiVersion") == builders.API_VERSION:
            return str(owner.get("name"))
    labels = body.get("metadata", {}).get("labels") or {}
    instance = labels.get(builders.LABEL_INSTANCE)
    return str(instance) if instance else None


class _Reactions:
    """The reconciles that events ask for (kopf's FineTuneJob events, the informers' child events), run
    on a pool of `KUBETUNE_RECONCILE_THREADS` threads: the threads that deliver events only read them.
    At most one is waiting per job and per namespace's admission: a burst of events about one job (its
    pod and its Job change together) makes one pass, which observes all of them, and the queue never
    holds more entries than there are jobs."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiting: set[tuple[str, ...]] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, key: tuple[str, ...], work: Callable[[], None], retry_after: float | None = None) -> bool:
        """Run `work` on the pool unless work for `key` is already waiting; False when it was. A failure
        is logged, and with `retry_after` submitted again that many seconds later."""
        with self._guard:
            if key in self._waiting:
                return False
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(RUNTIME.settings.reconcile_threads,
                                                                   thread_name_prefix="reaction")
            self._waiting.add(key)
            pool = self._pool

        def run() -> None:
            with self._guard:
                self._waiting.discard(key)
            try:
                work()
            except Exception:  # without `retry_after`, the resync converges later
                log.exception("%s failed%s", " ".join(key), f"; again in {retry_after:.0f} s" if retry_after else "")
                if retry_after:
                    retry = threading.Timer(retry_after, self.submit, (key, work, retry_after))
                    retry.daemon = True
                    retry.start()

        pool.submit(run)
        return True

    def stop(self) -> None:
        with self._guard:
            pool, self._pool = self._pool, None
            self._waiting.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


REACTIONS = _Reactions()


def child_event(kind: str, event_type: str, body: dict[str, Any]) -> None:
    """An informer's event about a child (a pod started or ended, a Job finished, serving became
    available), after the store has it: converge its FineTuneJob; when a trainer Job stops holding
    quota, start waiting jobs. Only while kopf runs this replica's handlers (`Runtime.leading`).

    The informers are the children's only watch: kopf does not watch them as well, so every child
    event is read, decoded and stored once (kopf's per-object workers would add a second copy of each)."""
    if not RUNTIME.leading():
        return
    body.setdefault("kind", kind)
    namespace = str((body.get("metadata") or {}).get("namespace") or "")
    name = _owner_name(body)
    settled = (namespace, name) in EVENTS.settled and kind != cache.DEPLOYMENT
    if namespace and name and not settled and EVENTS.child_changed(body, event_type):
        REACTIONS.submit(("reconcile of", namespace, name), functools.partial(reconcile_job, namespace, name))
    if namespace and _frees_quota(body, event_type):
        REACTIONS.submit(("admitting waiting jobs in", namespace), functools.partial(admit_waiting_jobs, namespace))


def _frees_quota(body: Mapping[str, Any], event_type: str | None) -> bool:
    """A trainer Job that finished, was suspended or was deleted no longer holds its quota share."""
    if body.get("kind") != "Job":
        return False
    if (body.get("metadata", {}).get("labels") or {}).get(builders.LABEL_COMPONENT) != builders.COMPONENT_TRAINER:
        return False
    if event_type == "DELETED" or body.get("spec", {}).get("suspend"):
        return True
    return quota.trainer_finished(dict(body))
