"""What the operator's two controllers share at run time: settings, the platform policy, the metrics
registry, the API client with its informers, per-object locks, the progress/metrics HTTP server, and
the periodic resyncs.

The FineTuneJob controller (`jobs/handlers.py`) and the FineTuneSweep controller
(`sweeps/handlers.py`) both use `RUNTIME`; neither reaches into the other. Nothing is read at
import: the settings come from the environment, and the policy from its file, the first time they
are asked for (in the operator, kopf's start-up handler), so importing the handlers in a test or a
tool reads no environment and no file.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import kopf

from kubetune.operator import metrics
from kubetune.operator.client import KubeClient, api_client
from kubetune.operator.platform import policy
from kubetune.operator.progress import server as progress
from kubetune.operator.settings import OperatorSettings

log = logging.getLogger(__name__)


class Runtime:
    """The operator process's shared state; one per process (`RUNTIME`)."""

    def __init__(self) -> None:
        self._settings: OperatorSettings | None = None
        self._policy: policy.PlatformPolicy | None = None
        self._metrics: metrics.OperatorMetrics | None = None
        self.client: KubeClient | None = None
        self.server: progress.HttpServer | None = None
        self.service: progress.ProgressService | None = None
        self.resyncs: list[Resync] = []
        """Started by the job controller's start-up handler; each controller adds its own."""
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._leading: tuple[float, bool] = (float("-inf"), False)

    @property
    def settings(self) -> OperatorSettings:
        """`KUBETUNE_*` settings, read from the environment on first use."""
        if self._settings is None:
            self._settings = OperatorSettings.from_env()
        return self._settings

    @settings.setter
    def settings(self, value: OperatorSettings) -> None:
        self._settings = value

    @property
    def policy(self) -> policy.PlatformPolicy:
        """The platform policy (quotas, allowed sources and images), read from its file on first use (the
        chart restarts the operator when it changes)."""
        if self._policy is None:
            self._policy = policy.load_policy(self.settings.policy_file)
        return self._policy

    @property
    def metrics(self) -> metrics.OperatorMetrics:
        """The operator's metrics; their registry also holds the sweep controller's, all served at
        `/metrics`."""
        if self._metrics is None:
            self._metrics = metrics.OperatorMetrics()
        return self._metrics

    def kube(self) -> KubeClient:
        if self.client is None:
            self.client = KubeClient(api_client(connections=2 * self.settings.reconcile_threads + 4))
        return self.client

    def lock(self, namespace: str, name: str) -> threading.Lock:
        """One lock per key: reconciles of one object never overlap (controllers use distinct names)."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def working_alone(self) -> bool:
        """Whether kopf cannot pause this replica: its peering object is absent (the chart creates one only
        for hot standbys). Only then may a resync act on objects kopf has not delivered: a paused standby's
        kopf delivers nothing, and so it must do nothing."""
        return not self.kube().peering_in_use(self.settings.peering_name, self.settings.namespaces)

    def leading(self) -> bool:
        """Whether kopf runs this replica's handlers now: no live peer of higher priority is listed in its
        peering object (kopf's rule for pausing; always true without one). What the operator does on its
        own informers' events (its children's changes) happens only then, as kopf's handlers do. Asked
        of the API server at most every `LEADING_TTL` seconds (children's events come in bursts)."""
        now = time.monotonic()
        if now - self._leading[0] > LEADING_TTL:
            paused = self.kube().peering_paused(self.settings.peering_name, self.settings.namespaces,
                                                self.settings.peering_priority)
            self._leading = (now, not paused)
        return self._leading[1]


LEADING_TTL = 2.0
"""Seconds `Runtime.leading` trusts its last answer (a paused standby may act this long after a
higher-priority peer appears; kopf itself reacts to the peering object's watch events)."""

RUNTIME = Runtime()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim(0)`); False where there is no
    such call. Python returns a freed object's memory to malloc, but malloc keeps the pages for reuse:
    after a burst (kopf resuming thousands of jobs at start-up) 15-20 MiB of free heap stayed resident
    (`bench/operator_scale.py --finished 2000`). Called after every resync pass (a few ms)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


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
        RUNTIME.metrics.resync_undelivered.labels(self.resource).inc(len(undelivered))
        RUNTIME.metrics.resync_passes.labels(self.resource).inc()
        await asyncio.to_thread(trim_heap)  # what the pass (or the events since the last) freed

    async def run_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.run_once()


class DeliveryWatch:
    """Does what kopf would have done for a watch event that kopf has not delivered `grace` seconds later.

    kopf watches a namespace only once its namespace watch has reported it, and a watch it is retrying
    delivers nothing meanwhile: the first jobs in a namespace created a moment before, and their
    children's changes, could otherwise wait for the resync. The operator's own informers see every
    event; each one is checked `grace` seconds later, and if kopf has delivered no event at all of that
    kind from that namespace since, `react` (the kopf handler's own work) runs for it. While kopf
    delivers anything from a namespace, nothing is done twice. Like the resync, the reaction acts only
    where no other replica may hold the lead (`react` decides that). One thread, started on first use.
    """

    def __init__(self, react: Callable[[str, str, str, str], None], grace: float = 5.0) -> None:
        self.react = react
        """(kind, namespace, name, event type) -> kopf's handler's work."""
        self.grace = grace
        self._pulse: dict[tuple[str, str], float] = {}
        """(kind, namespace) -> when kopf last delivered an event of that kind from that namespace."""
        self._due: list[tuple[float, float, int, str, str, str, str]] = []
        self._order = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.reacted = 0
        """Events `react` ran for (tests, metrics)."""

    def kopf_delivered(self, kind: str, namespace: str) -> None:
        """kopf delivered an event of `kind` from `namespace` (a handler's first line)."""
        self._pulse[(kind, namespace)] = time.monotonic()

    def seen(self, kind: str, event_type: str, body: dict[str, Any]) -> None:
        """An informer's watch event (its thread): check on it once `grace` has passed."""
        metadata = body.get("metadata") or {}
        namespace, name = str(metadata.get("namespace") or ""), str(metadata.get("name") or "")
        if not namespace or not name:
            return
        now = time.monotonic()
        with self._wake:
            self._order += 1
            heapq.heappush(self._due, (now + self.grace, now, self._order, kind, namespace, name, event_type))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="delivery-watch")
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._wake.wait(None if not self._due else self._due[0][0] - time.monotonic())
                _, seen_at, _, kind, namespace, name, event_type = heapq.heappop(self._due)
            self.check(kind, namespace, name, event_type, seen_at)

    def check(self, kind: str, namespace: str, name: str, event_type: str, seen_at: float) -> bool:
        """React to the event if kopf has delivered nothing of `kind` from `namespace` since `seen_at`."""
        if self._pulse.get((kind, namespace), float("-inf")) >= seen_at:
            return False
        try:
            self.react(kind, namespace, name, event_type)
        except Exception:  # noqa: BLE001 - the resync and kopf's own delivery still cover it
            log.exception("handling the undelivered %s event of %s %s/%s failed", event_type, kind, namespace, name)
        self.reacted += 1
        return True


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
