"""Micro-batching: one worker thread makes every ``predict`` call, on whatever has queued up.

Request handlers call :meth:`MicroBatcher.submit` (or ``await`` :meth:`MicroBatcher.predict`)
with one request each. The worker takes the first waiting request, then up to ``max_batch - 1``
more that arrive within ``wait_ms``, and calls ``predict`` once on the lot, which may mix
adapters (the runtime encodes them together where it can). Each caller gets its own result.

Inputs are meant to be checked before they are queued; should a batch call raise all the same,
its requests are predicted again one by one, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger(__name__)
_STOP = object()


class MicroBatcher:
    def __init__(self, predict: Callable[[list[dict]], list[dict]], max_batch: int = 16, wait_ms: float = 5):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._predict = predict
        self.max_batch = max_batch
        self.wait = max(wait_ms, 0) / 1000
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "fallbacks": 0}

    # -- callers ---------------------------------------------------------------------------
    def submit(self, request: dict) -> Future:
        """Queue one request; the future resolves to its result or its own exception."""
        self.start()
        future: Future = Future()
        self._queue.put((request, future))
        return future

    async def predict(self, request: dict) -> dict:
        return await asyncio.wrap_future(self.submit(request))

    # -- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="peftmm-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = 10) -> None:
        """Serve what is queued, then end the worker (a later submit starts a new one)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    # -- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._serve(batch)

    def _serve(self, batch: list[tuple[dict, Future]]) -> None:
        batch = [(request, future) for request, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        try:
            results = self._predict([request for request, _ in batch])
        except Exception as error:  # noqa: BLE001  (each caller gets its own outcome below)
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            self.stats["fallbacks"] += 1
            log.info("a batch of %d failed (%s); predicting its requests one by one", len(batch), error)
            for request, future in batch:
                try:
                    future.set_result(self._predict([request])[0])
                except Exception as single:  # noqa: BLE001
                    future.set_exception(single)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
