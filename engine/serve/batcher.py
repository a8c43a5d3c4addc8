"""Dynamic batching: worker threads share the engine and run the queued requests' windows as packed batches.

Requests arrive already split into windows (tokenized by the caller's thread). A worker takes the oldest job,
waits at most `max_wait_ms` for company while the queue holds fewer than `max_batch_tokens` tokens, then pops
whole jobs up to that budget and runs all their windows through `QAEngine.run_windows` (one packed forward per
`max_batch_tokens`). Each job's future receives the logits of its own windows; decoding happens back in the
caller's thread, so the workers do nothing but forwards. With `workers` > 1, one worker packs the next batch and
hands back results while another is inside a forward; on the 2-core CPU this measured no gain (docs/SERVING.md),
so the default is 1.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from engine.features import Window
from engine.qa import QAEngine

Logits = tuple[list[np.ndarray], list[np.ndarray]]  # start and end logits, one array per window


class QueueFull(RuntimeError):
    """The queue cannot take the submitted jobs now; retry later."""


class Closed(RuntimeError):
    """The batcher is draining or stopped and takes no new work."""


@dataclass(frozen=True)
class BatchConfig:
    """Batching knobs: token budget per packed forward, wait for company, queue bound (in requests), workers."""

    max_batch_tokens: int = 4096
    max_wait_ms: float = 2.0
    max_queue: int = 256
    workers: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_wait_ms < 0 or self.max_queue < 1 or self.workers < 1:
            raise ValueError("max_batch_tokens, max_queue and workers must be >= 1 and max_wait_ms >= 0")


@dataclass(eq=False)
class Job:
    """One example's windows, waiting for their logits in `future`."""

    windows: Sequence[Window]
    future: Future = field(default_factory=Future)
    enqueued: float = 0.0  # time.monotonic() at submit

    @property
    def tokens(self) -> int:
        """Tokens over all windows."""
        return sum(len(w.input_ids) for w in self.windows)


class Batcher:
    """Coalesces concurrent jobs into packed batches on `config.workers` threads; `close` drains before stopping."""

    def __init__(self, engine: QAEngine, config: BatchConfig, on_batch: Callable[[int, int, int], None] | None = None):
        self.engine = engine
        self.config = config
        self.on_batch = on_batch  # (jobs, windows, tokens) of every batch run, for metrics
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._closing = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"sparseqa-batcher-{i}", daemon=True)
            for i in range(config.workers)
        ]

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet taken by the worker)."""
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        """True while the workers run and take new work."""
        return any(t.is_alive() for t in self._threads) and not self._closing

    def start(self) -> None:
        """Start the workers (once)."""
        for t in self._threads:
            if t.ident is None:  # never started
                t.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all `jobs` or none: raises QueueFull when they do not fit, Closed while draining."""
        with self._cond:
            if not self.accepting:
                raise Closed("the server is shutting down")
            if len(self._queue) + len(jobs) > self.config.max_queue:
                raise QueueFull(f"queue full ({len(self._queue)} of {self.config.max_queue} waiting)")
            now = time.monotonic()
            for job in jobs:
                job.enqueued = now
                self._queue.append(job)
                self._queued_tokens += job.tokens
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its client left); True if it will never run."""
        with self._cond:
            if not job.future.cancel():
                return False
            try:
                self._queue.remove(job)
                self._queued_tokens -= job.tokens
            except ValueError:
                pass  # already popped: the worker skips cancelled futures
            return True

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, finish everything queued, then stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    def _take(self) -> list[Job]:
        """Block for the next batch of jobs (whole jobs, up to the token budget, at least one); [] to stop."""
        budget = self.config.max_batch_tokens
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = self._queue[0].enqueued + self.config.max_wait_ms / 1000
            while self._queue and self._queued_tokens < budget and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            jobs, tokens = [], 0
            while self._queue and (not jobs or tokens + self._queue[0].tokens <= budget):
                job = self._queue.popleft()
                self._queued_tokens -= job.tokens
                if job.future.set_running_or_notify_cancel():  # False: cancelled while queued
                    jobs.append(job)
                    tokens += job.tokens
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                with self._cond:
                    if self._closing and not self._queue:
                        return
                continue
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        flat = [w for job in jobs for w in job.windows]
        try:
            starts, ends = self.engine.run_windows(flat, batch_size=len(flat), max_tokens=self.config.max_batch_tokens)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error; the worker lives on
            for job in jobs:
                job.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(jobs), len(flat), sum(len(w.input_ids) for w in flat))
        k = 0
        for job in jobs:
            n = len(job.windows)
            job.future.set_result((starts[k : k + n], ends[k : k + n]))
            k += n
