"""Gathering concurrent generation requests into batches for the built-in server (continuous batching).

One generation thread owns the model. Requests queue here in arrival order.
When the model is idle and a request arrives, the thread waits up to `window`
seconds for companions, then starts a batch of up to `max_batch_size`
(`Engine.generate_batch`). While that batch runs, requests that arrive join it
between two decoding steps, as long as it has fewer than `max_batch_size` rows:
the engine prefills them on their own and left-aligns their KV cache with the
running one. Rows leave the batch as soon as they are done. So a new request
waits at most one decoding step plus its own prefill, not for a whole batch,
and one decoding step serves every running request.

Changes to the model itself (loading or removing a LoRA adapter while serving,
`call`) run on the same thread, between two batches: while one is pending no
request joins the running batch, so it drains and the change runs next.

Joining needs transformers' plain dynamic cache; models whose cache has
sliding-window or other layer types run static batches (requests arriving
meanwhile form the next batch). For large-scale serving, the `vllm` runtime
does the same with paged attention.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubetune.trainer.serve.engine import Engine, GenerationRequest

log = logging.getLogger(__name__)


class BatchScheduler:
    """A FIFO of generation requests and the one thread that runs them on the model in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        window: float,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._window = window
        self._on_step = on_step
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request`; its `future` resolves when it is done (thread-safe, never blocks)."""
        with self._changed:
            if self._closing:
                raise RuntimeError("the batch scheduler is closed")
            self._queue.append(request)
            self._changed.notify()

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `function` on the generation thread between two batches (thread-safe, never blocks);
        the future gets its result or exception. For changes to the model while serving."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._changed:
            if self._closing:
                raise RuntimeError("the batch scheduler is closed")
            self._tasks.append((function, future))
            self._changed.notify()
        return future

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()

    def _next_batch(self) -> list[GenerationRequest] | None:
        """Wait for work; the batch to run next, or None once closed and drained."""
        with self._changed:
            while not self._queue and not self._tasks and not self._closing:
                self._changed.wait()
            if self._tasks:
                return []  # run the model changes first
            if not self._queue:
                return None
            # The model was idle: give requests sent at about the same moment a chance to join.
            deadline = time.monotonic() + self._window
            while len(self._queue) < self._max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            count = min(len(self._queue), self._max_batch_size)
            return [self._queue.popleft() for _ in range(count)]

    def _take(self, room: int) -> list[GenerationRequest]:
        """Up to `room` queued requests, without waiting: they join the batch in progress."""
        with self._changed:
            # A pending model change: let the running batch drain so the change runs soon.
            count = 0 if self._tasks else min(room, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def _run_tasks(self) -> None:
        while True:
            with self._changed:
                if not self._tasks:
                    return
                function, future = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except Exception as error:  # noqa: BLE001 - the caller gets it through the future
                future.set_exception(error)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                self._run_tasks()
                continue
            try:
                self._engine.generate_batch(batch, self._take, self._max_batch_size, self._on_step)
            except Exception:  # noqa: BLE001 - each request already got the error; keep serving
                log.exception("a generation batch of %d failed", len(batch))
