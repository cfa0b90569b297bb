"""The operator's API-server access: read a job and its children, carry out a decision.

Together with `handlers` and `progress`, the only module with network side
effects. Creating answers 409 when the child is already there, which is fine:
child names are deterministic. Deleting answers 404 when it is already gone.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import queue
import secrets
import threading
import time
from datetime import datetime, timezone
from collections.abc import Callable, Iterator
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from kubetune.operator import cache
from kubetune.operator.jobs import builders, reconcile
from kubetune.operator.jobs.reconcile import CreateChild, DeleteChild, Observed, PatchChild, ReplaceChild

Body = dict[str, Any]
GROUP = builders.API_GROUP
VERSION = builders.API_VERSION.split("/")[1]
PLURAL = builders.PLURAL
KOPF_GROUP, KOPF_VERSION = "kopf.dev", "v1"
KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS = "kueue.x-k8s.io", "v1beta2", "workloads"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""Kueue's label on a Workload: the uid of the Job it admits."""
KOPF_PEERINGS, CLUSTER_KOPF_PEERINGS = "kopfpeerings", "clusterkopfpeerings"
"""kopf's peering resources: one object per namespace, or one for a cluster-wide operator."""
SIGNING_KEY_FIELD = "secret-key"
"""Key of the signing key inside its Secret (the chart's `progressKey.secretKey` default)."""
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
"""Accept header that makes the API server answer a GET with the object's metadata only."""


log = logging.getLogger(__name__)


def api_client(connections: int | None = None) -> kubernetes.client.ApiClient:
    """An API client from the pod's service account, or from KUBECONFIG / ~/.kube/config; with
    `connections`, that many pooled connections (the reconcile threads, the informers' and the
    progress server's calls at once: the client's default pool is 5 per core)."""
    configuration = kubernetes.client.Configuration()
    if connections is not None:
        configuration.connection_pool_maxsize = connections
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def status_changes(current: Body | None, patch: Body) -> bool:
    """Whether merge-patching `patch` into `current` would change anything (top-level fields compared).

    Every reconcile pass decides the whole status; most passes (child events, the resync timer)
    find it unchanged, and skipping those writes saves a request and the watch event it causes.
    """
    status = current or {}
    return any(key not in status or status[key] != value for key, value in patch.items())


class ChildConflict(Exception):
    """A create answered 409 for a name the cache does not hold: something that is not ours has it.
    The name is now read from the API (`cache.Store.read_directly`); observe again to report it."""


ERROR_CAUSES = ("api", "conflict", "internal")
"""What a failed reconcile met (`kubetune_reconcile_errors_total{cause}`): the API server's answer or
the connection to it (retried: a busy or restarting API server), a child name held by an object not
ours (retried after observing it), or an error of the operator's own (a bug: look at its log)."""


def error_cause(error: BaseException) -> str:
    """Which of `ERROR_CAUSES` a reconcile's exception is."""
    if isinstance(error, ChildConflict):
        return "conflict"
    if isinstance(error, (ApiException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return "api"
    return "internal"


class EventPoster:
    """Posts Events from one background thread, in the order given: a reconcile never waits for them
    (client-go's event recorder works the same way). At most `capacity` wait; beyond that an Event is
    dropped and counted (`dropped`): an Event is a notice to people, never state the operator reads."""

    def __init__(self, post: Callable[[str, Body], None], capacity: int = 2000) -> None:
        self._post = post
        self._queue: queue.Queue[tuple[str, Body]] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.dropped = 0
        self.posted = 0

    def submit(self, namespace: str, body: Body) -> bool:
        """Queue one Event; False (and counted) when the queue is full."""
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="event-poster")
                self._thread.start()
        try:
            self._queue.put_nowait((namespace, body))
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("%d Events dropped: more than %d waiting to be posted", self.dropped, self._queue.maxsize)
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until every queued Event has been posted (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def _run(self) -> None:
        while True:
            namespace, body = self._queue.get()
            try:
                self._post(namespace, body)
                self.posted += 1
            except Exception as error:  # noqa: BLE001 - events are best-effort; the next one is tried
                log.warning("could not post event %s on %s/%s: %s", body.get("reason"), namespace,
                            (body.get("involvedObject") or {}).get("name"), getattr(error, "reason", error))
            finally:
                self._queue.task_done()


class KubeClient:
    """Typed access to what reconcile needs, over one ApiClient; reads from `cache` once it has synced."""

    def __init__(self, client: kubernetes.client.ApiClient, child_cache: cache.Cache | None = None) -> None:
        self.api = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.cache = child_cache
        self.reads_cache = True
        """Whether reads are answered from `cache` once it has synced (`KUBETUNE_CACHE`); without, the
        informers only deliver the children's events."""
        self.event_poster = EventPoster(self._post_event_now)
        self._readers: dict[str, tuple[Callable[..., Any], Body]] = {
            cache.JOB: (self.batch.read_namespaced_job, {}),
            cache.CONFIG_MAP: (self.core.read_namespaced_config_map, {}),
            # Metadata only: the operator never reads a Secret's data (its own token included; it can
            # derive that), so a same-named Secret someone else made leaks nothing to it.
            cache.SECRET: (self.core.read_namespaced_secret, {"_headers": {"Accept": METADATA_ONLY}}),
            cache.DEPLOYMENT: (self.apps.read_namespaced_deployment, {}),
            cache.SERVICE: (self.core.read_namespaced_service, {}),
        }

    # -- the cache -------------------------------------------------------------------

    def build_cache(self, namespaces: tuple[str, ...], secret_ttl: float) -> cache.Cache:
        """Informers for the FineTuneJobs and the children in `namespaces` (kopf's patterns): one per
        kind and namespace when they are plain names (namespaced RBAC suffices), else cluster-wide ones
        filtered by the patterns. Children are selected by label server-side."""
        store = cache.Store(secret_ttl)
        children = f"{builders.LABEL_MANAGED_BY}={builders.MANAGED_BY}"
        exact = cache.exact_namespaces(namespaces)

        def informers(namespace: str | None) -> list[cache.Informer]:
            if namespace is None:
                in_scope = cache.namespace_matcher(namespaces)
                calls: dict[str, Callable[..., Any]] = {
                    cache.FINETUNEJOB: functools.partial(self.custom.list_custom_object_for_all_namespaces,
                                                         GROUP, VERSION, PLURAL),
                    cache.JOB: self.batch.list_job_for_all_namespaces,
                    cache.POD: self.core.list_pod_for_all_namespaces,
                    cache.CONFIG_MAP: self.core.list_config_map_for_all_namespaces,
                    cache.DEPLOYMENT: self.apps.list_deployment_for_all_namespaces,
                    cache.SERVICE: self.core.list_service_for_all_namespaces,
                }
            else:
                in_scope = functools.partial(str.__eq__, namespace)
                calls = {
                    cache.FINETUNEJOB: functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                                         namespace, PLURAL),
                    cache.JOB: functools.partial(self.batch.list_namespaced_job, namespace),
                    cache.POD: functools.partial(self.core.list_namespaced_pod, namespace),
                    cache.CONFIG_MAP: functools.partial(self.core.list_namespaced_config_map, namespace),
                    cache.DEPLOYMENT: functools.partial(self.apps.list_namespaced_deployment, namespace),
                    cache.SERVICE: functools.partial(self.core.list_namespaced_service, namespace),
                }
            return [cache.Informer(kind, call, store, in_scope, "" if kind == cache.FINETUNEJOB else children)
                    for kind, call in calls.items()]

        scopes: tuple[str | None, ...] = exact if exact is not None else (None,)
        return cache.Cache(store, {scope: informers(scope) for scope in scopes})

    def _store(self, namespace: str) -> cache.Store | None:
        """The store when it can answer for `namespace` (its informers have listed once), else None."""
        if self.cache is not None and self.reads_cache and self.cache.synced(namespace):
            return self.cache.store
        return None

    def remember(self, kind: str, body: Body) -> None:
        """Write-through: what the API server answered to a write is the newest copy there is."""
        if self.cache is not None and isinstance(body, dict) and body.get("metadata"):
            self.cache.store.upsert(kind, body)

    def job(self, namespace: str, name: str) -> Body | None:
        """The FineTuneJob, from memory once the cache has synced; a miss is read from the API server.

        A miss is rare (a deleted job) but can be a race: the informer's first list, taken just before
        the job was created, may replace the store after kopf's event put the job in, and its ADDED
        event triggers no reconcile. Answering None then would leave the new job untouched until the
        next resync."""
        store = self._store(namespace)
        if store is not None:
            found = store.get(cache.FINETUNEJOB, namespace, name)
            if found is not None:
                return found
        return self.get_finetunejob(namespace, name)

    # -- reading -----------------------------------------------------------------

    def get_finetunejob(self, namespace: str, name: str) -> Body | None:
        try:
            result = cast(Body, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return result

    @staticmethod
    def _json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Body:
        """Call a client method and parse its JSON answer directly: the generated models'
        deserialise-then-sanitise round trip costs milliseconds of CPU per object, the operator's
        largest CPU cost when many jobs change at once. Non-2xx answers still raise ApiException."""
        response = call(*args, _preload_content=False, **kwargs)
        return cast(Body, json.loads(response.data))

    def read_child(self, kind: str, namespace: str, name: str) -> Body | None:
        """A child by name: from memory when the cache holds the namespace (Secrets: when their metadata
        was remembered recently), else one GET (remembered for next time when it is a Secret)."""
        store = self._store(namespace)
        if store is not None and kind == cache.SECRET:
            remembered = store.get(kind, namespace, name)
            if remembered is not None or store.known_absent(kind, namespace, name):
                return remembered
        elif store is not None and not store.is_direct(kind, namespace, name):
            return store.get(kind, namespace, name)
        read, options = self._readers[kind]
        try:
            body = self._json(read, name, namespace, **options)
        except ApiException as error:
            if error.status == 404:
                if store is not None and kind == cache.SECRET:
                    store.note_absent(kind, namespace, name)
                return None
            raise
        if kind == cache.SECRET:
            self.remember(kind, body)
        return body

    def _get(self, kind: str, namespace: str, name: str, owner_uid: str, foreign: list[str],
             job_name: str = "") -> Body | None:
        """The child of that name when this job (`owner_uid`) controls it; a same-named object that it
        does not control is described in `foreign` (reconcile then creates nothing that would use it)."""
        body = self.read_child(kind, namespace, name)
        if body is None:
            return None
        if reconcile.controlled_by(body, owner_uid):
            return body
        foreign.append(reconcile.describe_foreign(body, kind, job_name))
        return None

    def _pods(self, namespace: str, job_name: str) -> tuple[Body, ...]:
        store = self._store(namespace)
        if store is not None:
            return store.pods_of(namespace, job_name)
        pods = self._json(self.core.list_namespaced_pod, namespace,
                          label_selector=f"{cache.POD_JOB_LABEL}={job_name}")
        return tuple(pods.get("items") or [])

    def _finetunejob(self, namespace: str, name: str) -> Body | None:
        """Another FineTuneJob of the namespace (a shared-serving host, a `fromJob` source): from memory
        when the cache holds the namespace, else one GET."""
        store = self._store(namespace)
        if store is not None:
            return store.get(cache.FINETUNEJOB, namespace, name)
        return self.get_finetunejob(namespace, name)

    def list_finetunejobs(self, namespace: str, labels: dict[str, str] | None = None) -> tuple[Body, ...]:
        """The namespace's FineTuneJobs (with `labels`: those that carry them): from memory once the cache
        holds the namespace, else one list from the API server."""
        store = self._store(namespace)
        if store is not None:
            return store.list(cache.FINETUNEJOB, namespace, labels)
        selector = ",".join(f"{key}={value}" for key, value in (labels or {}).items())
        listing = cast(Body, self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=selector or None))
        return tuple(listing.get("items") or [])

    def peering_in_use(self, name: str, namespaces: tuple[str, ...]) -> bool:
        """Whether kopf's peering object `name` exists where this operator peers (cluster-wide without
        `namespaces`, else in each watched namespace): then other replicas may hold the lead and kopf
        may pause this one. Without it kopf works alone. Lists by name (the chart's RBAC allows list,
        not get); any doubt (a 403, an error) answers True. No peering CRD at all answers False."""
        peerings = self._peerings(name, namespaces)
        return peerings is None or bool(peerings)

    def peering_paused(self, name: str, namespaces: tuple[str, ...], priority: int) -> bool:
        """Whether kopf pauses a replica of `priority` under peering `name`: a live peer of higher priority
        is listed there (kopf's own rule: each peer's `lastseen` + `lifetime` in the object's status).
        No peering object: never paused (kopf works alone). Any doubt (a 403, an error): paused."""
        peerings = self._peerings(name, namespaces)
        if peerings is None:
            return True
        now = datetime.now(timezone.utc)
        for peering in peerings:
            for peer in (peering.get("status") or {}).values():
                if not isinstance(peer, dict) or int(peer.get("priority") or 0) <= priority:
                    continue
                try:
                    seen = datetime.fromisoformat(str(peer.get("lastseen")).replace("Z", "+00:00"))
                    lifetime = float(peer.get("lifetime") or 60)
                except ValueError:
                    return True
                if seen.tzinfo is None:
                    seen = seen.replace(tzinfo=timezone.utc)
                if (now - seen).total_seconds() < lifetime:
                    return True
        return False

    def _peerings(self, name: str, namespaces: tuple[str, ...]) -> list[Body] | None:
        """kopf's peering objects named `name` in this operator's scope; None when that cannot be told."""
        by_name = f"metadata.name={name}"
        try:
            if not namespaces:
                listings = [self.custom.list_cluster_custom_object(
                    KOPF_GROUP, KOPF_VERSION, CLUSTER_KOPF_PEERINGS, field_selector=by_name)]
            elif (exact := cache.exact_namespaces(namespaces)) is not None:
                listings = [self.custom.list_namespaced_custom_object(
                    KOPF_GROUP, KOPF_VERSION, n, KOPF_PEERINGS, field_selector=by_name) for n in exact]
            else:
                listings = [self.custom.list_cluster_custom_object(
                    KOPF_GROUP, KOPF_VERSION, KOPF_PEERINGS, field_selector=by_name)]
        except ApiException as error:
            return [] if error.status == 404 else None
        except Exception:  # noqa: BLE001 - in doubt, assume peers
            log.exception("could not tell whether kopf peering %r is in use", name)
            return None
        in_scope = cache.namespace_matcher(namespaces)
        return [item for listing in listings for item in cast(Body, listing).get("items") or []
                if not namespaces or in_scope(str((item.get("metadata") or {}).get("namespace") or ""))]

    def each_finetunejob(self, namespaces: tuple[str, ...]) -> Iterator[Body]:
        """Every FineTuneJob where the operator works (`KUBETUNE_NAMESPACES` patterns; none = the whole
        cluster), read from the API server in pages of `cache.LIST_PAGE` (start-up only: the usage
        counters' seed). One page is decoded at a time, not every job's body at once."""
        exact = cache.exact_namespaces(namespaces)
        in_scope = cache.namespace_matcher(namespaces)
        for namespace in exact if exact is not None else (None,):
            token = ""
            while True:
                paging: dict[str, Any] = {"limit": cache.LIST_PAGE} | ({"_continue": token} if token else {})
                listing = cast(Body, self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, **paging) if namespace is not None
                    else self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **paging))
                yield from (item for item in listing.get("items") or []
                            if in_scope(str((item.get("metadata") or {}).get("namespace") or "")))
                token = str((listing.get("metadata") or {}).get("continue") or "")
                if not token:
                    break

    def list_trainer_jobs(self, namespace: str) -> tuple[Body, ...]:
        store = self._store(namespace)
        if store is not None:
            return store.list(cache.JOB, namespace, {builders.LABEL_MANAGED_BY: builders.MANAGED_BY,
                                                     builders.LABEL_COMPONENT: builders.COMPONENT_TRAINER})
        selector = (f"{builders.LABEL_MANAGED_BY}={builders.MANAGED_BY},"
                    f"{builders.LABEL_COMPONENT}={builders.COMPONENT_TRAINER}")
        jobs = self._json(self.batch.list_namespaced_job, namespace, label_selector=selector)
        return tuple(jobs.get("items") or [])

    def list_kueue_workloads(self, namespace: str, trainer_job: Body) -> tuple[Body, ...]:
        """Kueue's Workloads of a trainer Job (Kueue labels each with its Job's uid). Empty when Kueue's
        API is not installed (404) or the operator may not read it (403: the chart's RBAC for Kueue is
        off): the operator then only ever suspends a queued Job, as before it read Workloads."""
        uid = (trainer_job.get("metadata") or {}).get("uid")
        if not uid:
            return ()
        try:
            listing = self._json(self.custom.list_namespaced_custom_object, KUEUE_GROUP, KUEUE_VERSION, namespace,
                                 KUEUE_WORKLOADS, label_selector=f"{KUEUE_JOB_UID_LABEL}={uid}")
        except ApiException as error:
            if error.status in (403, 404):
                return ()
            raise
        return tuple(listing.get("items") or [])

    def observe(self, namespace: str, name: str, *, with_quota: bool = False) -> Observed | None:
        """The job and its children now, or None when the job is gone; `with_quota` also reads the
        namespace's FineTuneJobs and trainer Jobs (what quota admission counts)."""
        job = self.job(namespace, name)
        if job is None:
            return None
        uid = job["metadata"]["uid"]
        child = reconcile.child_names(name)
        foreign: list[str] = []
        trainer_job = self._get(cache.JOB, namespace, child["trainer_job"], uid, foreign, name)
        validation_job = self._get(cache.JOB, namespace, child["validation_job"], uid, foreign, name)
        # Skipped reads (each reconcile pass costs requests; child events make many passes): the
        # validation pods only matter until the trainer Job exists, and serving children can only
        # exist once the job has finished (or still holds an endpoint).
        status = job.get("status") or {}
        finished = any(c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"
                       for c in status.get("conditions") or [])
        # A trainer Job that completed counts too: an operator killed after it created the serving
        # children but before it wrote Succeeded must read them, not create them a second time.
        # Only for a job that serves: the others' serving children do not exist (reads of what cannot
        # exist are not cached, and a busy platform makes thousands of such passes).
        spec_serving = (job.get("spec") or {}).get("serving") or {}
        serves = isinstance(spec_serving, dict) and bool(spec_serving.get("enabled") or spec_serving.get("shareWith"))
        trained = serves and bool(trainer_job and ((trainer_job.get("status") or {}).get("succeeded") or any(
            c.get("type") == "Complete" and c.get("status") == "True"
            for c in (trainer_job.get("status") or {}).get("conditions") or [])))
        serving = finished or trained or bool(status.get("endpoint"))
        config_map = self._get(cache.CONFIG_MAP, namespace, child["config_map"], uid, foreign, name)
        store = self._store(namespace)
        if not status and store is not None:  # a new job: its Secret is missing unless a create says otherwise
            store.presume_absent(cache.SECRET, namespace, child["progress_secret"])
        # Secrets: metadata only (see read_child).
        progress_secret = self._get(cache.SECRET, namespace, child["progress_secret"], uid, foreign, name)
        serving_deployment = self._get(cache.DEPLOYMENT, namespace, child["serving"], uid, foreign, name) \
            if serving else None
        serving_service = self._get(cache.SERVICE, namespace, child["serving"], uid, foreign, name) \
            if serving else None
        # Metadata only as well: the key's digest is an annotation the operator wrote on it.
        serving_key_secret = self._get(cache.SECRET, namespace, child["serving_key"], uid, foreign, name) \
            if serving else None
        # Shared serving (spec.serving.shareWith): a guest reads the job it names; a job serving
        # on its own reads the guests naming it, and the ConfigMap listing their adapters.
        share_with = spec_serving.get("shareWith") if isinstance(spec_serving, dict) else None
        hosting = serving and bool(spec_serving.get("enabled")) and not share_with
        serving_host = self._finetunejob(namespace, share_with) if serving and share_with else None
        serving_guests = tuple(
            other for other in self.list_finetunejobs(namespace)
            if ((other.get("spec") or {}).get("serving") or {}).get("shareWith") == name) if hosting else ()
        serving_adapters = self._get(cache.CONFIG_MAP, namespace, child["serving_adapters"], uid, foreign, name) \
            if serving else None
        # spec.model.fromJob: the source job matters only until status.lineage pins its model.
        model = (job.get("spec") or {}).get("model") or {}
        from_job = model.get("fromJob") if isinstance(model, dict) else None
        source_job = self._finetunejob(namespace, from_job) \
            if isinstance(from_job, str) and from_job and not status.get("lineage") else None
        resources = (job.get("spec") or {}).get("resources") or {}
        queued = isinstance(resources, dict) and bool(resources.get("queueName"))
        return Observed(
            job=job,
            now=datetime.now(timezone.utc),
            serving_host=serving_host,
            serving_guests=serving_guests,
            serving_adapters_config_map=serving_adapters,
            source_job=source_job,
            config_map=config_map,
            progress_secret=progress_secret,
            validation_job=validation_job,
            validation_pods=self._pods(namespace, child["validation_job"]) if validation_job and not trainer_job
            else (),
            trainer_job=trainer_job,
            trainer_pods=self._pods(namespace, child["trainer_job"]) if trainer_job else (),
            serving_deployment=serving_deployment,
            serving_service=serving_service,
            foreign_children=tuple(foreign),
            serving_key_secret=serving_key_secret,
            kueue_workloads=self.list_kueue_workloads(namespace, trainer_job) if trainer_job and queued else (),
            namespace_jobs=self.list_finetunejobs(namespace) if with_quota else (),
            namespace_trainer_jobs=self.list_trainer_jobs(namespace) if with_quota else (),
        )

    # -- writing -------------------------------------------------------------------

    def apply(self, observed: Observed, decision: reconcile.Decision) -> None:
        """Carry out the actions, write the status, post the events (in that order)."""
        namespace = observed.job["metadata"]["namespace"]
        for action in decision.actions:
            if isinstance(action, CreateChild):
                self.create(namespace, action.manifest)
            elif isinstance(action, PatchChild):
                self.patch(namespace, action)
            elif isinstance(action, ReplaceChild):
                self.replace(namespace, action)
            elif isinstance(action, DeleteChild):
                self.delete(namespace, action)
        if status_changes(observed.job.get("status"), decision.status_patch):
            self.patch_status(namespace, observed.job["metadata"]["name"], decision.status_patch)
        for event in decision.events:
            self.post_event(observed.job, event)

    def create(self, namespace: str, manifest: Body) -> None:
        kind = manifest["kind"]
        creators: dict[str, Callable[..., Any]] = {
            "Job": self.batch.create_namespaced_job,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Secret": self.core.create_namespaced_secret,
            "Deployment": self.apps.create_namespaced_deployment,
            "Service": self.core.create_namespaced_service,
        }
        name = manifest["metadata"]["name"]
        try:
            self.remember(kind, self._json(creators[kind], namespace, manifest))
            log.info("created %s %s/%s", kind, namespace, name)
        except ApiException as error:
            if error.status != 409:
                raise
            store = self._store(namespace)
            if store is not None and kind == cache.SECRET:
                # Remembered as absent, yet there: read it again, and stop before creating what mounts it.
                store.forget(kind, namespace, name)
                raise ChildConflict(f"Secret {namespace}/{name} exists") from error
            if store is not None and store.get(kind, namespace, name) is None:
                # Not in memory although ours would be (write-through, label-selected watches):
                # someone else's object holds the name. Stop before creating what would use it.
                store.read_directly(kind, namespace, name)
                raise ChildConflict(f"{kind} {namespace}/{name} exists and is not in the cache") from error

    def patch(self, namespace: str, action: PatchChild) -> None:
        if action.kind == "Workload":  # Kueue's: not one of the children the cache holds
            self.custom.patch_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, KUEUE_WORKLOADS,
                                                       action.name, action.patch)
            log.info("patched Kueue Workload %s/%s: %s", namespace, action.name, json.dumps(action.patch["spec"]))
            return
        patchers = {"Job": self.batch.patch_namespaced_job, "ConfigMap": self.core.patch_namespaced_config_map,
                    "Service": self.core.patch_namespaced_service}
        self.remember(action.kind, self._json(patchers[action.kind], action.name, namespace, action.patch))

    def replace(self, namespace: str, action: ReplaceChild) -> None:
        """PUT the manifest; a 409 (changed since observed) raises, and the retry observes again."""
        replacers: dict[str, Callable[..., Any]] = {"Deployment": self.apps.replace_namespaced_deployment}
        manifest = {**action.manifest, "metadata": {**action.manifest["metadata"],
                                                    "resourceVersion": action.resource_version}}
        self.remember(action.manifest["kind"],
                      self._json(replacers[action.manifest["kind"]], manifest["metadata"]["name"], namespace, manifest))
        log.info("replaced %s %s/%s", action.manifest["kind"], namespace, manifest["metadata"]["name"])

    def delete(self, namespace: str, action: DeleteChild) -> None:
        deleters = {
            "Job": self.batch.delete_namespaced_job,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Secret": self.core.delete_namespaced_secret,
            "Deployment": self.apps.delete_namespaced_deployment,
            "Service": self.core.delete_namespaced_service,
            "Pod": self.core.delete_namespaced_pod,
        }
        grace: dict[str, Any] = {} if action.grace_seconds is None else {"grace_period_seconds": action.grace_seconds}
        try:
            deleters[action.kind](action.name, namespace, propagation_policy="Background", **grace)
        except ApiException as error:
            if error.status != 404:
                raise

    def ensure_signing_key(self, namespace: str, name: str) -> bytes:
        """The progress-token signing key in Secret `namespace/name` (key `secret-key`): created with
        a random value when absent (create first, so the operator only reads a Secret it made, or
        one a person put there for it), else reused."""
        key = secrets.token_urlsafe(36)
        manifest: Body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": name, "namespace": namespace,
                                       "labels": {builders.LABEL_MANAGED_BY: builders.MANAGED_BY}},
                          "stringData": {SIGNING_KEY_FIELD: key}}
        try:
            create: Callable[..., Any] = self.core.create_namespaced_secret  # takes a plain dict body too
            create(namespace, manifest)
            log.info("created the signing key Secret %s/%s", namespace, name)
            return key.encode()
        except ApiException as error:
            if error.status != 409:
                raise
        data = self._json(self.core.read_namespaced_secret, name, namespace).get("data") or {}
        if not data.get(SIGNING_KEY_FIELD):
            raise RuntimeError(f"Secret {namespace}/{name} has no {SIGNING_KEY_FIELD!r} key: add one (any random "
                               "string of 32+ characters) or delete the Secret so the operator creates it")
        return base64.b64decode(data[SIGNING_KEY_FIELD])

    def patch_status(self, namespace: str, name: str, status: Body) -> None:
        """Merge-patch `status` of a FineTuneJob (the status subresource)."""
        try:
            self.remember(cache.FINETUNEJOB, self._json(self.custom.patch_namespaced_custom_object_status,
                                                        GROUP, VERSION, namespace, PLURAL, name, {"status": status}))
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile
                raise

    def post_event(self, job: Body, event: reconcile.Event) -> None:
        metadata = job["metadata"]
        now = datetime.now(timezone.utc)
        body = {
            "metadata": {"name": f"{metadata['name']}.{secrets.token_hex(8)}", "namespace": metadata["namespace"]},
            "involvedObject": {"apiVersion": builders.API_VERSION, "kind": builders.KIND, "name": metadata["name"],
                               "namespace": metadata["namespace"], "uid": metadata["uid"],
                               "resourceVersion": metadata.get("resourceVersion")},
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": builders.MANAGED_BY},
            "reportingComponent": "kubetune.io/operator",
            "reportingInstance": "kubetune-operator",
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        self.event_poster.submit(metadata["namespace"], body)

    def _post_event_now(self, namespace: str, body: Body) -> None:
        """One Event, answered as raw JSON (the generated model's round trip is CPU for nothing)."""
        self._json(self.core.create_namespaced_event, namespace, body)
