"""Dynamic batching: one worker thread per device takes queued items of one kind as a batch.

When does a batch close? A fixed wait (5 ms was tried) gives alternating 7/1 batches under 8
clients: the batch of 7 runs, the 8th request queues alone, is taken alone as soon as the
worker is free, and the 7 come back while it runs. Here a worker that finds fewer items
queued than could come waits for more, and the wait is tied to what a batch costs:

* the batch closes at once when it is full (``max_batch_size``), or when it holds as many
  items as were recently in flight at once (so a lone client never waits);
* otherwise it waits at most ``min(max_wait_s, wait_fraction * T)``, from the moment the
  worker is free, with ``T`` the measured (moving average) compute time of a batch of that
  kind: the straggler waits a fraction of a batch for the 7 to come back, instead of
  making them wait a whole batch for it.

Items of different kinds (predict, explain with one method, ...) never share a batch; the
kind of the oldest queued item goes first. Results and errors go to per-item futures, so
a failure stays within its batch (and bad requests never get here: they are refused when
decoded).
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable, Dict, Hashable, List, Optional, Sequence

from fastsal.serve.errors import Unavailable


class _Job:
    __slots__ = ("key", "item", "future")

    def __init__(self, key, item, future):
        self.key = key
        self.item = item
        self.future = future


RunBatch = Callable[[int, Hashable, List[object]], Sequence[object]]


class Batcher:
    """Queue items, run them in batches on ``workers`` threads (one per device).

    ``run_batch(worker_index, key, items)`` returns one result per item, in order.
    ``on_batch(key, size, seconds)`` is told about every batch (for metrics).
    """

    def __init__(self, run_batch: RunBatch, workers: int = 1, max_batch_size: int = 8, max_wait_s: float = 0.05,
                 wait_fraction: float = 0.5, on_batch: Optional[Callable[[Hashable, int, float], None]] = None,
                 worker_init: Optional[Callable[[int], None]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.wait_fraction = float(wait_fraction)
        self._run = run_batch
        self._on_batch = on_batch
        self._worker_init = worker_init
        self._cond = threading.Condition()
        self._queue: "collections.deque[_Job]" = collections.deque()
        self._closing = False
        self._ema: Dict[Hashable, float] = {}
        self._outstanding = 0  # items announced (arriving, queued or running) and not yet finished
        self._running = 0  # items inside a batch now
        self._peaks: "collections.deque[tuple]" = collections.deque()  # (time, outstanding) when it rose
        self.batch_sizes: "collections.Counter" = collections.Counter()  # (key, size) -> batches
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"fastsal-serve-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- load estimate ---------------------------------------------------------------------
    def arriving(self, n: int = 1) -> None:
        """``n`` items are on their way (a request is being decoded); ``-n`` if they will not come."""
        with self._cond:
            self._outstanding += n
            if n > 0:
                self._peaks.append((time.monotonic(), self._outstanding))

    def _recent_peak(self, now: float) -> int:
        window = max(1.0, 4.0 * max(self._ema.values(), default=0.0))
        while self._peaks and self._peaks[0][0] < now - window:
            self._peaks.popleft()
        return max([p for _, p in self._peaks] + [self._outstanding])

    def wait_bound(self, key: Hashable) -> float:
        """How long a worker waits for a batch of ``key`` to fill, at most."""
        t = self._ema.get(key)
        return self.max_wait_s if t is None else min(self.max_wait_s, self.wait_fraction * t)

    def record(self, key: Hashable, seconds: float) -> None:
        """Fold a measured batch time into the moving average (warm-up batches seed it)."""
        with self._cond:
            old = self._ema.get(key)
            self._ema[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    # -- queue ---------------------------------------------------------------------------
    def submit(self, key: Hashable, item: object) -> Future:
        """Queue ``item`` (already announced with :meth:`arriving`); its result comes in the future."""
        fut: Future = Future()
        with self._cond:
            if self._closing:
                self._outstanding -= 1
                raise Unavailable("the server is shutting down: retry on another replica")
            self._queue.append(_Job(key, item, fut))
            self._cond.notify()
        return fut

    def _take(self) -> Optional[List[_Job]]:
        """The next batch (the caller holds the lock), or None when closed and drained."""
        while not self._queue:
            if self._closing:
                return None
            self._cond.wait()
        key = self._queue[0].key
        start = time.monotonic()
        while not self._closing:
            n = sum(1 for j in self._queue if j.key == key)
            if n >= self.max_batch_size:
                break
            now = time.monotonic()
            could_come = min(self.max_batch_size, self._recent_peak(now) - self._running)
            remaining = start + self.wait_bound(key) - now
            if n >= could_come or remaining <= 0:
                break
            self._cond.wait(remaining)
        batch, keep = [], collections.deque()
        while self._queue:
            job = self._queue.popleft()
            (batch if job.key == key and len(batch) < self.max_batch_size else keep).append(job)
        self._queue = keep
        self._running += len(batch)
        return batch

    def _loop(self, index: int) -> None:
        if self._worker_init is not None:
            self._worker_init(index)
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            key = batch[0].key
            t0 = time.perf_counter()
            try:
                results = self._run(index, key, [j.item for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
                error = None
            except BaseException as exc:  # noqa: BLE001 - handed to the batch's futures
                results, error = None, exc
            seconds = time.perf_counter() - t0
            with self._cond:
                self._running -= len(batch)
                self._outstanding -= len(batch)
                if error is None:
                    old = self._ema.get(key)
                    self._ema[key] = seconds if old is None else 0.8 * old + 0.2 * seconds
                self.batch_sizes[(key, len(batch))] += 1
                self._cond.notify_all()
            if self._on_batch is not None:
                try:
                    self._on_batch(key, len(batch), seconds)
                except Exception:  # noqa: BLE001 - metrics never fail a batch
                    pass
            for i, job in enumerate(batch):
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(results[i])

    def close(self, timeout: Optional[float] = None) -> bool:
        """Refuse new items, finish the queued ones, stop the workers; True if they all stopped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = any(t.is_alive() for t in self._threads)
        if alive:  # a batch still running past the timeout: its requests fail, the rest too
            with self._cond:
                pending, self._queue = list(self._queue), collections.deque()
            for job in pending:
                job.future.set_exception(Unavailable("the server shut down before this request ran"))
        return not alive
