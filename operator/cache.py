"""Watch-fed copies of FineTuneJobs and their children in memory, so a reconcile reads no API server.

The informer pattern of client-go / controller-runtime, in the small: one
list-then-watch per kind (label-selected to the operator's own children),
feeding a `Store` that answers `get`, `pods_of` and `list` from memory.
Reconcile stays pure: `client.KubeClient.observe` builds the same `Observed`
from the store that it used to build from six GETs and two pod lists.

Freshness, the usual caveats of a cache and how each is met:

- Writes go through: what the API server answers to a create, patch or
  status patch is stored at once (newer `resourceVersion` wins), so the next
  pass sees its own writes even before their watch events arrive.
- kopf's own watch events (they trigger reconciles) are stored before the
  reconcile runs, so a trigger never reads an older copy than its event.
- Until every informer of a namespace has listed once, reads go to the API
  server (a restarted operator must not mistake an empty cache for "no
  children").
- A same-named object that is not ours carries none of our labels, so no
  informer sees it; a create answering 409 for a name the store does not
  hold marks that name "read from the API" (`read_directly`), and from then
  on it is read like before: the conflict is reported, not hidden.

Secrets are never listed or watched (RBAC gives the operator no list/watch
on them: either would hand it every Secret's data). The store remembers the
metadata of a Secret it created or read (metadata only, the data stripped)
for `secret_ttl` seconds; after that the next pass reads its metadata again.

Objects are kept as compact JSON bytes, zlib-compressed (level 1), not dicts:
a stored FineTuneJob costs ~1 KB instead of its ~4 KB of JSON or ~5x that in
Python objects, and every reader gets its own copy, so nothing can mutate what
another pass reads. Pods keep metadata and status only (reconcile reads no pod
spec); `managedFields` go everywhere, and from FineTuneJobs the
`last-handled-configuration` annotation that kopf kept on them in earlier versions (a
copy of the spec, ~1.5 KB, that nothing reads now).

This module does no I/O itself: the list and watch calls are given to it
(`client.KubeClient.informer_calls`), so it can be tested with real
responses as well as with plain functions.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Body = dict[str, Any]
log = logging.getLogger(__name__)

FINETUNEJOB = "FineTuneJob"
JOB = "Job"
POD = "Pod"
CONFIG_MAP = "ConfigMap"
SECRET = "Secret"
DEPLOYMENT = "Deployment"
SERVICE = "Service"
WATCHED_KINDS = (FINETUNEJOB, JOB, POD, CONFIG_MAP, DEPLOYMENT, SERVICE)
"""Kinds an informer keeps; Secrets are only remembered (see the module docstring)."""
POD_JOB_LABEL = "batch.kubernetes.io/job-name"
"""The label the Job controller puts on its pods: the index `pods_of` answers from."""
TOMBSTONES = 4096
"""Deleted objects remembered (with their last resourceVersion) so that a late, older copy from the
other watch (kopf's or the informer's) cannot bring them back; oldest forgotten first."""

LIST_PAGE = 500
"""Objects per page when an informer lists (the API server's `limit`/`continue`)."""

KOPF_DIFFBASE_ANNOTATION = "kubetune.io/last-handled-configuration"
"""kopf's copy of the spec it last handled (the FineTuneJob controller configures kopf with it): kopf
reads it from its own watch's bodies, never from this store, so the store does not keep it."""
COMPRESSION_LEVEL = 1
"""zlib level of stored objects: level 1 already shrinks a FineTuneJob's JSON ~3x, at ~20 us a write."""

Key = tuple[str, str, str]
"""(kind, namespace, name)"""


def newer(candidate: str, current: str) -> bool:
    """Whether resourceVersion `candidate` is newer than `current`. resourceVersions are opaque by
    contract but etcd's are increasing integers; anything else counts as newer (the last write wins)."""
    if candidate.isdigit() and current.isdigit():
        return int(candidate) > int(current)
    return candidate != current


def trim(kind: str, body: Body) -> Body:
    """What the store keeps of an object: no managedFields (often half an object's size), pods without
    most of their spec (reconcile reads metadata and status; usage reads `nodeName` and each
    container's name and resources: the devices really allocated), Secrets without data."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    if kind == FINETUNEJOB and KOPF_DIFFBASE_ANNOTATION in (metadata.get("annotations") or {}):
        metadata["annotations"] = {k: v for k, v in metadata["annotations"].items() if k != KOPF_DIFFBASE_ANNOTATION}
    kept = {**body, "metadata": metadata}
    if kind == POD:
        spec = body.get("spec") or {}
        kept["spec"] = {"nodeName": spec.get("nodeName")} | {
            key: [{"name": c.get("name"), "resources": c.get("resources") or {}} for c in spec[key]]
            for key in ("containers", "initContainers") if isinstance(spec.get(key), list)}
    elif kind == SECRET:
        kept = {"apiVersion": body.get("apiVersion", "v1"), "kind": "Secret", "metadata": metadata}
    return kept


def encode(body: Body) -> bytes:
    """What the store keeps of a (trimmed) object: its compact JSON, compressed."""
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), COMPRESSION_LEVEL)


def decode(data: bytes) -> Body:
    """A fresh copy of a stored object (the reverse of `encode`)."""
    result: Body = json.loads(zlib.decompress(data))
    return result


@dataclasses.dataclass(frozen=True)
class _Entry:
    resource_version: str
    """metadata.resourceVersion of the stored copy (newer copies replace it, older ones are dropped)."""
    uid: str
    """metadata.uid: a tombstone only blocks copies of the object it was, not a recreated one."""
    labels: tuple[tuple[str, str], ...]
    """The object's labels, for `list` without decoding every object."""
    data: bytes
    """The trimmed object as compact JSON, zlib-compressed (`encode`/`decode`)."""
    stored_at: float
    """time.monotonic() when stored (Secrets expire by it)."""


class Store:
    """Objects by (kind, namespace, name), plus pods by their Job; safe to use from any thread."""

    def __init__(self, secret_ttl: float = 30.0) -> None:
        self.secret_ttl = secret_ttl
        """Seconds a remembered Secret's metadata is trusted before it is read again."""
        self._lock = threading.Lock()
        self._objects: dict[Key, _Entry] = {}
        self._names: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        """(kind, namespace) -> names: `list` without scanning every object."""
        self._pods: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        """(namespace, Job name) -> pod names."""
        self._tombstones: collections.OrderedDict[Key, tuple[str, str]] = collections.OrderedDict()
        self._direct: set[Key] = set()
        self._absent: dict[Key, float] = {}
        """Secrets a GET found missing, and when: not read again for `secret_ttl` seconds."""
        self._presumed: collections.OrderedDict[Key, None] = collections.OrderedDict()
        """Names `presume_absent` took as missing once (the latest `TOMBSTONES`)."""

    # -- writing ---------------------------------------------------------------------

    def upsert(self, kind: str, body: Body) -> bool:
        """Store `body` unless the stored copy (or the object's deletion) is newer; True when stored."""
        metadata = body.get("metadata") or {}
        namespace, name = str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
        if not name:
            return False
        key = (kind, namespace, name)
        version, uid = str(metadata.get("resourceVersion") or ""), str(metadata.get("uid") or "")
        with self._lock:  # the common repeat (a write's answer, then its watch event) skips the encoding
            current = self._objects.get(key)
            if current is not None and current.uid == uid and version and not newer(version, current.resource_version):
                return False
        kept = trim(kind, body)
        entry = _Entry(version, uid, tuple(sorted((metadata.get("labels") or {}).items())),
                       encode(kept), time.monotonic())
        with self._lock:
            gone = self._tombstones.get(key)
            if gone is not None and gone[0] == uid and not newer(version, gone[1]):
                return False
            current = self._objects.get(key)
            if current is not None and current.uid == uid and version and not newer(version, current.resource_version):
                return False
            self._put(key, entry, metadata)
            self._absent.pop(key, None)
            return True

    def remove(self, kind: str, body: Body) -> None:
        """The object was deleted (a watch's DELETED event)."""
        metadata = body.get("metadata") or {}
        key = (kind, str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))
        uid, version = str(metadata.get("uid") or ""), str(metadata.get("resourceVersion") or "")
        with self._lock:
            current = self._objects.get(key)
            if current is not None and (not uid or current.uid == uid):
                self._drop(key)
            self._tombstones[key] = (uid, version)
            self._tombstones.move_to_end(key)
            while len(self._tombstones) > TOMBSTONES:
                self._tombstones.popitem(last=False)

    def replace(self, kind: str, bodies: Iterable[Body], in_scope: Callable[[str], bool],
                list_version: str = "") -> None:
        """A fresh listing of `kind` (after a start or an expired watch), taken at `list_version`: what
        is not in it is gone, unless it was stored from a newer event meanwhile (kopf's watch runs on
        its own: a job created after the listing must not be dropped by it)."""
        listed = list(bodies)
        self.retain(kind, {(str((b.get("metadata") or {}).get("namespace") or ""), str(b["metadata"]["name"]))
                           for b in listed}, in_scope, list_version)
        for body in listed:
            self.upsert(kind, body)

    def retain(self, kind: str, names: set[tuple[str, str]], in_scope: Callable[[str], bool],
               list_version: str = "") -> list[Body]:
        """The end of a listing (paged: its objects were upserted page by page) that held only `names`
        ((namespace, name)): drop the other objects of `kind` in scope, unless stored from a newer
        event than `list_version`. Returns what was dropped, as stubs (kind, name, namespace, uid,
        labels): the deletions the listing revealed."""
        dropped: list[Body] = []
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind and in_scope(k[1]) and (k[1], k[2]) not in names]:
                entry = self._objects[key]
                if list_version and newer(entry.resource_version, list_version):
                    continue
                dropped.append({"kind": kind, "metadata": {"namespace": key[1], "name": key[2], "uid": entry.uid,
                                                           "labels": dict(entry.labels)}})
                self._drop(key)
        return dropped

    def note_absent(self, kind: str, namespace: str, name: str) -> None:
        """A GET answered 404 (Secrets only: other kinds are watched, so their absence is known)."""
        with self._lock:
            self._absent[(kind, namespace, name)] = time.monotonic()
            if len(self._absent) > TOMBSTONES:  # entries outlive their TTL only until the next pass
                cutoff = time.monotonic() - self.secret_ttl
                self._absent = {k: t for k, t in self._absent.items() if t >= cutoff}

    def presume_absent(self, kind: str, namespace: str, name: str) -> bool:
        """Take an unknown name as missing without a GET, once per name: for a Secret of a job no pass has
        finished yet (no status), which can exist only if an earlier pass died after creating it. Then
        its create answers 409, `forget` drops the presumption, and the pass that observes again reads
        it. True when the name is now presumed missing."""
        key = (kind, namespace, name)
        with self._lock:
            if key in self._presumed or key in self._objects or key in self._absent:
                return False
            self._presumed[key] = None
            while len(self._presumed) > TOMBSTONES:
                self._presumed.popitem(last=False)
        self.note_absent(kind, namespace, name)
        return True

    def known_absent(self, kind: str, namespace: str, name: str) -> bool:
        """Whether a GET found it missing less than `secret_ttl` seconds ago."""
        with self._lock:
            seen = self._absent.get((kind, namespace, name))
        return seen is not None and time.monotonic() - seen <= self.secret_ttl

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """Drop what is remembered of a name (its next read goes to the API)."""
        with self._lock:
            self._absent.pop((kind, namespace, name), None)
            self._drop((kind, namespace, name))

    def read_directly(self, kind: str, namespace: str, name: str) -> None:
        """Something not ours holds this name: from now on it is read from the API, not from memory."""
        with self._lock:
            self._direct.add((kind, namespace, name))

    def is_direct(self, kind: str, namespace: str, name: str) -> bool:
        with self._lock:
            return (kind, namespace, name) in self._direct

    def _put(self, key: Key, entry: _Entry, metadata: Body) -> None:
        self._drop(key)
        self._objects[key] = entry
        self._names[(key[0], key[1])].add(key[2])
        job_name = (metadata.get("labels") or {}).get(POD_JOB_LABEL)
        if key[0] == POD and job_name:
            self._pods[(key[1], str(job_name))].add(key[2])

    def _drop(self, key: Key) -> None:
        entry = self._objects.pop(key, None)
        if entry is None:
            return
        names = self._names.get((key[0], key[1]))
        if names is not None:
            names.discard(key[2])
            if not names:
                del self._names[(key[0], key[1])]
        job_name = dict(entry.labels).get(POD_JOB_LABEL)
        if key[0] == POD and job_name:
            pods = self._pods.get((key[1], job_name))
            if pods is not None:
                pods.discard(key[2])
                if not pods:
                    del self._pods[(key[1], job_name)]

    # -- reading ---------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Body | None:
        """A copy of the stored object, or None (not there, or a Secret remembered too long ago)."""
        with self._lock:
            entry = self._objects.get((kind, namespace, name))
        if entry is None:
            return None
        if kind == SECRET and time.monotonic() - entry.stored_at > self.secret_ttl:
            return None
        result: Body = decode(entry.data)
        return result

    def pods_of(self, namespace: str, job_name: str) -> tuple[Body, ...]:
        """The pods of one Job (by the Job controller's `batch.kubernetes.io/job-name` label)."""
        with self._lock:
            entries = [self._objects[(POD, namespace, n)] for n in sorted(self._pods.get((namespace, job_name), ()))]
        return tuple(decode(entry.data) for entry in entries)

    def list(self, kind: str, namespace: str, labels: dict[str, str] | None = None) -> tuple[Body, ...]:
        """Every stored object of `kind` in `namespace` carrying all of `labels`."""
        wanted = set((labels or {}).items())
        with self._lock:
            entries = [self._objects[(kind, namespace, n)] for n in sorted(self._names.get((kind, namespace), ()))]
        return tuple(decode(e.data) for e in entries if wanted <= set(e.labels))

    def every(self, kind: str) -> tuple[Body, ...]:
        """Every stored object of `kind`, in every namespace."""
        with self._lock:
            entries = [self._objects[(kind, namespace, name)]
                       for (stored, namespace), names in self._names.items() if stored == kind
                       for name in sorted(names)]
        return tuple(decode(e.data) for e in entries)

    def size(self) -> dict[str, int]:
        """Objects held per kind (for metrics and benchmarks)."""
        with self._lock:
            counts = collections.Counter(key[0] for key in self._objects)
        return dict(counts)


# -- which namespaces --------------------------------------------------------------------


def namespace_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """`KUBETUNE_NAMESPACES` as a predicate, with kopf's meaning: globs (`team-*`), `!pattern` excludes;
    no patterns = every namespace; only exclusions = every other namespace."""
    included = [p for p in patterns if not p.startswith("!")]
    excluded = [p[1:] for p in patterns if p.startswith("!")]

    def matches(namespace: str) -> bool:
        if any(fnmatch.fnmatchcase(namespace, p) for p in excluded):
            return False
        return not included or any(fnmatch.fnmatchcase(namespace, p) for p in included)

    return matches


def exact_namespaces(patterns: Iterable[str]) -> tuple[str, ...] | None:
    """The namespaces themselves when every pattern is a plain name (then each gets namespaced watches,
    which namespaced RBAC allows); None when a glob, an exclusion or nothing is given (cluster-wide)."""
    names = tuple(patterns)
    if not names or any(p.startswith("!") or any(c in p for c in "*?[") for p in names):
        return None
    return names


# -- informers ---------------------------------------------------------------------------

ListCall = Callable[..., Any]
"""A list call of the API client for one kind and scope, taking `watch`, `resource_version`,
`label_selector`, `timeout_seconds`, `allow_watch_bookmarks`, `_preload_content`, `_request_timeout`."""


def lines_of(response: Any) -> Iterator[bytes]:
    """The newline-delimited JSON events of a streamed watch response (urllib3), one per line."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        *complete, pending = (pending + chunk).split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


@dataclasses.dataclass
class Informer:
    """List once, then watch from that resourceVersion, feeding `store`; relist when the watch expires."""

    kind: str
    """The kind it keeps (a `WATCHED_KINDS` entry)."""
    list_call: ListCall
    """The API client's list call for this kind and scope (one namespace, or all of them)."""
    store: Store
    in_scope: Callable[[str], bool]
    """Whether a namespace is watched (a cluster-wide informer filters with it)."""
    label_selector: str = ""
    """Server-side filter: the operator's children carry `app.kubernetes.io/managed-by=kubetune`."""
    watch_seconds: int = 300
    """Server-side timeout of one watch request; the next continues from the last resourceVersion."""
    page_size: int = LIST_PAGE
    """Objects per page of a listing (`limit`); 0 = the whole listing in one response."""
    synced: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set once the first listing is stored."""
    events: int = 0
    """Watch events received (for tests and benchmarks)."""
    on_event: Callable[[str, str, dict[str, Any]], None] | None = None
    """Called with (kind, event type, object) for each watch event, in the informer's thread, after the
    store has it; after a relisting also for each object it found changed ("MODIFIED") or gone
    ("DELETED", a stub with the metadata the store kept). Not for the first listing: the resume of
    every FineTuneJob at start-up covers what happened before."""

    def run(self, stop: threading.Event) -> None:
        """Until `stop`: list, watch, and after any error wait a moment and start over."""
        backoff = 0.5
        while not stop.is_set():
            try:
                version = self._list()
                if not self.synced.is_set():
                    log.info("%s informer: first listing stored", self.kind)
                self.synced.set()
                backoff = 0.5
                while not stop.is_set() and version:
                    version = self._watch(version, stop)
            except Exception as error:  # noqa: BLE001 - any failure: list again (the store stays as it was)
                if stop.is_set():
                    return
                log.warning("%s informer: %s; listing again in %.1f s", self.kind, error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _list(self) -> str:
        """List in pages of `page_size` (one page decoded at a time: a listing in one piece holds every
        object's decoded body at once, a peak Python's allocator keeps); returns the listing's
        resourceVersion. An expired continue token (410) raises: `run` lists again from the start."""
        names: set[tuple[str, str]] = set()
        token, version = "", ""
        relisting = self.synced.is_set()
        changed: list[Body] = []
        while True:
            paging: dict[str, Any] = {"limit": self.page_size} if self.page_size else {}
            if token:
                paging["_continue"] = token
            response = self.list_call(label_selector=self.label_selector, _preload_content=False,
                                      _request_timeout=60, **paging)
            listing = json.loads(response.data)
            del response
            for item in listing.get("items") or []:
                metadata = item.get("metadata") or {}
                if not self.in_scope(str(metadata.get("namespace") or "")):
                    continue
                item.setdefault("kind", self.kind)  # list items carry no kind
                names.add((str(metadata.get("namespace") or ""), str(metadata.get("name") or "")))
                if self.store.upsert(self.kind, item) and relisting:
                    changed.append(item)
            list_metadata = listing.get("metadata") or {}
            version = str(list_metadata.get("resourceVersion") or version)
            token = str(list_metadata.get("continue") or "")
            del listing
            if not token:
                break
        gone = self.store.retain(self.kind, names, self.in_scope, version)
        if relisting and self.on_event is not None:
            # What changed while no watch ran (an expired watch, an error): the same events a watch
            # would have given, so nothing that happened meanwhile waits for a resync.
            for body in changed:
                self.on_event(self.kind, "MODIFIED", body)
            for body in gone:
                self.on_event(self.kind, "DELETED", body)
        return version

    def _watch(self, version: str, stop: threading.Event) -> str:
        """One watch request; returns the resourceVersion to continue from, "" to list again (410 Gone)."""
        response = self.list_call(label_selector=self.label_selector, watch=True, resource_version=version,
                                  allow_watch_bookmarks=True, timeout_seconds=self.watch_seconds,
                                  _preload_content=False, _request_timeout=(10, self.watch_seconds + 30))
        try:
            for line in lines_of(response):
                if stop.is_set():
                    return version
                event = json.loads(line)
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    log.info("%s informer: watch ended (%s); listing again", self.kind, body.get("message"))
                    return ""
                version = str((body.get("metadata") or {}).get("resourceVersion") or version)
                self.events += 1
                if kind == "BOOKMARK":
                    continue
                if not self.in_scope(str((body.get("metadata") or {}).get("namespace") or "")):
                    continue
                if kind == "DELETED":
                    self.store.remove(self.kind, body)
                else:
                    self.store.upsert(self.kind, body)
                if self.on_event is not None:
                    self.on_event(self.kind, str(kind), body)
        finally:
            response.release_conn()
        return version


class Cache:
    """The informers of every watched kind and scope, their store, and the threads that run them."""

    def __init__(self, store: Store, informers: dict[str | None, list[Informer]]) -> None:
        self.store = store
        self.informers = informers
        """Namespace (None: cluster-wide) -> its informers."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def on_event(self, kinds: Iterable[str], callback: Callable[[str, str, dict[str, Any]], None]) -> None:
        """Call `callback(kind, event type, object)` for each watch event of `kinds` from now on (set it
        before `start`)."""
        wanted = set(kinds)
        for informers in self.informers.values():
            for informer in informers:
                if informer.kind in wanted:
                    informer.on_event = callback

    def start(self) -> None:
        for scope, informers in self.informers.items():
            for informer in informers:
                thread = threading.Thread(target=informer.run, args=(self._stop,), daemon=True,
                                          name=f"informer-{informer.kind}-{scope or 'all'}")
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        """Ends the informers (each at its next event or watch timeout; the threads are daemons)."""
        self._stop.set()

    def synced(self, namespace: str) -> bool:
        """Whether every informer covering `namespace` has listed once (before that, read the API)."""
        informers = self.informers.get(namespace) or self.informers.get(None) or []
        return bool(informers) and all(informer.synced.is_set() for informer in informers)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for informers in self.informers.values():
            for informer in informers:
                if not informer.synced.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True
