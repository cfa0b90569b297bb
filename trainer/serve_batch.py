"""Gathering concurrent generation requests into batches for the built-in server.

One generation thread owns the model. Requests queue here in arrival order;
the thread takes up to `max_batch_size` of them at a time and runs them as one
batch (`Engine.generate_batch`). When the model is idle and a request arrives,
the thread waits up to `window` seconds for companions before starting, so
clients that send at about the same time share a batch instead of the first one
running alone. Requests that arrive while a batch runs form the next batch.

Why static batches rather than continuous batching: with transformers' dynamic
KV cache, a row can leave a running batch cheaply (`batch_select_indices`) but
joining one means re-aligning every layer's cache. Rows leave as soon as they
are done, so a short answer is never held back by a long one; a new request
waits at most for the batch in progress. On a small model, where one decoding
step costs about the same for one row as for sixteen, this gives most of the
throughput; for large-scale serving the `vllm` runtime does continuous
batching with paged attention.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from kubetune.trainer.serve_engine import Engine, GenerationRequest

log = logging.getLogger(__name__)


class BatchScheduler:
    """A FIFO of generation requests and the one thread that runs them on the model in batches."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        window: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._window = window
        self._on_batch = on_batch
        self._queue: collections.deque[GenerationRequest] = collections.deque()
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

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()

    def _next_batch(self) -> list[GenerationRequest] | None:
        """Wait for work; the batch to run next, or None once closed and drained."""
        with self._changed:
            while not self._queue and not self._closing:
                self._changed.wait()
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

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                self._engine.generate_batch(batch)
            except Exception:  # noqa: BLE001 - each request already got the error; keep serving
                log.exception("a generation batch of %d failed", len(batch))
