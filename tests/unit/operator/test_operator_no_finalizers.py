"""Uninstall never hangs: no kopf handler puts a finalizer on FineTuneJobs or FineTuneSweeps, and the
periodic resync that replaces kopf's timers reconciles exactly the tracked objects."""

from __future__ import annotations

import asyncio
import time

import kopf
import pytest

from kubetune.operator.jobs import handlers
from kubetune.operator.runtime import RUNTIME, Resync
from kubetune.operator.sweeps import handlers as sweep_handlers


def test_no_handler_needs_a_finalizer() -> None:
    """A finalizer nobody removes (the operator uninstalled first) makes `kubectl delete crd` hang:
    kopf adds one for every timer, daemon and non-optional delete handler."""
    registry = kopf.get_default_registry()
    needing = [h.id for part in (registry._changing, registry._spawning)  # noqa: SLF001 (kopf has no public view)
               for h in part.get_all_handlers() if h.requires_finalizer]
    assert needing == []
    assert sweep_handlers.SWEEP_RESYNC in RUNTIME.resyncs and handlers.JOB_RESYNC in RUNTIME.resyncs


def test_the_resync_reconciles_tracked_objects_and_survives_a_failure() -> None:
    seen: list[tuple[str, str]] = []

    def reconcile(namespace: str, name: str) -> None:
        seen.append((namespace, name))
        if name == "broken":
            raise RuntimeError("API unavailable")

    resync = Resync(reconcile, "")
    resync.track("a", "pending", True)
    resync.track("a", "broken", True)
    resync.track("a", "finished", True)
    resync.track("a", "finished", False)
    resync.track(None, "no-namespace", True)
    asyncio.run(resync.run_once())
    assert sorted(seen) == [("a", "broken"), ("a", "pending")]


def test_the_resync_also_reconciles_what_its_discovery_finds_and_survives_a_failed_listing() -> None:
    """kopf delivers a new namespace's objects only once its own namespace watch has reported it; the
    operator's reads (`discover`) find them anyway, once each, next to the tracked ones."""
    seen: list[tuple[str, str]] = []
    resync = Resync(lambda namespace, name: seen.append((namespace, name)), "",
                             discover=lambda: [("new", "unseen-by-kopf"), ("a", "tracked")])
    resync.track("a", "tracked", True)
    asyncio.run(resync.run_once())
    assert sorted(seen) == [("a", "tracked"), ("new", "unseen-by-kopf")]

    def broken() -> list[tuple[str, str]]:
        raise RuntimeError("API unavailable")

    seen.clear()
    resync.discover = broken
    asyncio.run(resync.run_once())
    assert seen == [("a", "tracked")]


def resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_free_heap_goes_back_to_the_system() -> None:
    """Objects over 512 bytes live on the C heap: freed ones leave pages malloc keeps for reuse (holes
    between live ones that the heap's end cannot give back) until `trim_heap` returns them."""
    from kubetune.operator import runtime

    assert runtime.trim_heap()  # glibc (Linux): the only platform the operator image runs on
    blocks = [bytes(4000) + bytes([i % 251]) for i in range(40_000)]  # ~160 MiB on the heap
    del blocks[::4], blocks[::3]  # holes of 12+ KB (whole pages) between the survivors
    before = resident_mib()
    runtime.trim_heap()
    assert before - resident_mib() > 15, "malloc kept the freed pages"
    del blocks


def test_every_resync_pass_trims_the_heap(monkeypatch: object) -> None:
    from kubetune.operator import runtime

    trims: list[bool] = []
    monkeypatch.setattr(runtime, "trim_heap", lambda: trims.append(True) or True)  # type: ignore[attr-defined]
    resync = Resync(lambda namespace, name: None, "")
    asyncio.run(resync.run_once())
    asyncio.run(resync.run_once())
    assert len(trims) == 2


def test_an_event_kopf_has_not_delivered_is_handled_after_the_grace() -> None:
    """An informer saw events; kopf (its namespace watch not caught up) delivered nothing from one namespace:
    that namespace's events are handled `grace` seconds later, in order. Where kopf delivered anything of
    the kind from the namespace since, nothing is done twice."""
    from kubetune.operator import runtime

    handled: list[tuple[str, str, str, str]] = []
    watch = runtime.DeliveryWatch(lambda kind, namespace, name, event: handled.append((kind, namespace, name, event)),
                                  grace=0.1)
    watch.seen("FineTuneJob", "ADDED", {"metadata": {"namespace": "silent", "name": "first", "uid": "u1"}})
    watch.seen("Pod", "MODIFIED", {"metadata": {"namespace": "silent", "name": "first-validate-x"}})
    watch.seen("FineTuneJob", "ADDED", {"metadata": {"namespace": "watched", "name": "other"}})
    watch.seen("Pod", "MODIFIED", {"metadata": {"namespace": "watched", "name": "other-train-x"}})
    watch.kopf_delivered("FineTuneJob", "watched")  # kopf is watching FineTuneJobs there, not yet pods
    started = time.monotonic()
    deadline = started + 10
    while len(handled) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # anything else due at the same moment has been checked by now

    assert handled == [("FineTuneJob", "silent", "first", "ADDED"), ("Pod", "silent", "first-validate-x", "MODIFIED"),
                       ("Pod", "watched", "other-train-x", "MODIFIED")]
    assert time.monotonic() - started >= 0.1
    assert watch.reacted == 3
    assert not watch.check("FineTuneJob", "watched", "other", "MODIFIED", seen_at=time.monotonic() - 1)


def test_an_undelivered_job_is_reconciled_only_with_work_pending_and_no_leader_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.operator import cache

    reconciled: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers, "reconcile_job", lambda namespace, name: reconciled.append((namespace, name)))
    store = cache.Store(60)
    store.upsert(cache.FINETUNEJOB, {"kind": "FineTuneJob", "metadata": {"namespace": "a", "name": "new"}, "spec": {}})
    store.upsert(cache.FINETUNEJOB, {"kind": "FineTuneJob", "metadata": {"namespace": "a", "name": "done"}, "spec": {},
                                     "status": {"phase": "Succeeded", "conditions": [
                                         {"type": "Succeeded", "status": "True"}]}})

    class Kube:
        cache = type("C", (), {"store": store})()

    monkeypatch.setattr(RUNTIME, "kube", lambda: Kube())
    alone = [False]
    monkeypatch.setattr(RUNTIME, "working_alone", lambda: alone[0])
    monkeypatch.setattr(handlers, "_alone", [float("-inf"), False])

    handlers._undelivered(cache.FINETUNEJOB, "a", "new", "ADDED")
    assert reconciled == []  # another replica may lead
    alone[0] = True
    monkeypatch.setattr(handlers, "_alone", [float("-inf"), False])
    for name in ("new", "done", "gone"):
        handlers._undelivered(cache.FINETUNEJOB, "a", name, "ADDED")
    assert reconciled == [("a", "new")]
