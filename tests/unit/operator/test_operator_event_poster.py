"""Events are posted in the background, in order; a reconcile never waits for the API server's answer."""

from __future__ import annotations

import threading
import time

from kubetune.operator.client import EventPoster


def test_events_are_posted_in_order_without_the_caller_waiting() -> None:
    posted: list[str] = []
    gate = threading.Event()

    def post(namespace: str, body: dict[str, str]) -> None:
        gate.wait(10)  # a slow API server
        posted.append(f"{namespace}/{body['reason']}")

    poster = EventPoster(post)
    started = time.monotonic()
    for reason in ("ValidatingDataset", "DatasetValid", "Training"):
        assert poster.submit("team-a", {"reason": reason})
    assert time.monotonic() - started < 1 and posted == []  # queued, not waited for
    gate.set()
    assert poster.flush(10)
    assert posted == ["team-a/ValidatingDataset", "team-a/DatasetValid", "team-a/Training"]
    assert poster.posted == 3 and poster.dropped == 0


def test_a_full_queue_drops_and_counts_and_a_failed_post_does_not_stop_the_next() -> None:
    gate = threading.Event()
    posted: list[str] = []

    def post(namespace: str, body: dict[str, str]) -> None:
        gate.wait(10)
        if body["reason"] == "Refused":
            raise RuntimeError("403 Forbidden")
        posted.append(body["reason"])

    poster = EventPoster(post, capacity=2)
    results = [poster.submit("ns", {"reason": r}) for r in ("Refused", "B", "C", "D", "E")]
    # The first is taken by the poster thread (or still queued); at most 2 wait; the rest are dropped.
    assert results[:2] == [True, True] and not all(results)
    assert poster.dropped == results.count(False) >= 2
    gate.set()
    assert poster.flush(10)
    assert "Refused" not in posted and posted[0] == "B"
    assert poster.posted == len(posted)
