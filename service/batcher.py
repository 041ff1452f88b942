"""The micro-batcher: coalesce concurrent requests into one forward on ONE inference thread.

Requests put their rows in a bounded queue and await a future; the inference thread takes the queued
rows (up to `max_rows`), runs one forward under `inference_mode` and hands each request its scores back
with one `call_soon_threadsafe` per batch. A lone request is taken at once; the thread only waits (at
most `max_wait`) while other requests are known to be on their way (announced with `expect()` while
they read their contexts), and rows that arrive while a forward runs are naturally batched into the
next one. A full queue raises `BatcherOverloaded` (the route answers 503 with Retry-After).

The thread is the batcher (no event-loop task relays the work): a request costs one thread wake-up and
one loop wake-up, and the loop spends nothing on batching.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from contract.inputs import ModelInputs
from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy

log = logging.getLogger("saco.service.batcher")


class BatcherOverloaded(RuntimeError):
    pass


class Ticket:
    """A request announced to the batcher; closed once its rows are queued (or it gave up)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher
        with batcher._ready:
            batcher._expected += 1

    def close(self) -> None:
        if self._batcher is not None:
            with self._batcher._ready:
                self.close_locked()

    def close_locked(self) -> None:
        """`close` for a caller that holds the batcher's lock."""
        if self._batcher is not None:
            self._batcher._expected -= 1
            self._batcher._ready.notify()  # a thread waiting for this request stops waiting
            self._batcher = None


@dataclass
class _Job:
    policy: LoadedPolicy
    inputs: ModelInputs
    future: asyncio.Future[np.ndarray]
    table: np.ndarray | None = None  # a model scoring by features: the campaign's action table
    enqueued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self, *, max_rows: int, max_wait_s: float, queue_size: int, threads: int, metrics: ServiceMetrics
    ) -> None:
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()  # guards _jobs, _expected and _stopping
        self._expected = 0
        self._stopping = False
        self._threads = threads
        self._metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._work, name="saco-inference", daemon=True)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)
        with self._ready:
            left, self._jobs = list(self._jobs), collections.deque()
        for job in left:
            if not job.future.done():
                job.future.set_exception(BatcherOverloaded("service is shutting down"))

    @contextlib.contextmanager
    def expect(self) -> Iterator[Ticket]:
        """Announce a request that will submit rows soon (the batcher may wait for it until it does)."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.close()

    async def scores(
        self,
        policy: LoadedPolicy,
        inputs: ModelInputs,
        ticket: Ticket | None = None,
        table: np.ndarray | None = None,
    ) -> np.ndarray:
        """The policy's output for these inputs (`LoadedPolicy.scores`; `table`: the campaign's action table
        of a model scoring by features), from a forward shared with the other requests queued with it."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            with self._ready:
                if self._stopping or len(self._jobs) >= self.queue_size:
                    self._metrics.overloaded.inc()
                    raise BatcherOverloaded("inference queue is full")
                self._jobs.append(_Job(policy, inputs, future, table))
                if ticket is not None:
                    # closed with the rows queued, under the same lock: the thread that takes them must not
                    # see this request still announced and wait for it (an extra wake-up per request)
                    ticket.close_locked()
                self._ready.notify()
        finally:
            if ticket is not None:
                ticket.close()
        return await future

    # ---- the inference thread --------------------------------------------------------------------
    def _work(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                jobs = self._take()
            started = time.perf_counter()
            try:
                results: list[np.ndarray] | BaseException = _forward(jobs)
                finished = time.perf_counter()
                for job in jobs:
                    self._metrics.queue_wait.observe(started - job.enqueued_at)
                self._metrics.batch_rows.observe(sum(job.inputs.rows for job in jobs))
                self._metrics.inference_seconds.observe(finished - started)
            except Exception as exc:  # the thread must outlive any failure: every job gets an answer
                log.exception("inference failed")
                results = exc
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_deliver, jobs, results)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _take(self) -> list[_Job]:
        """The next batch (called holding the lock): queued jobs up to max_rows; while fewer, wait for
        announced requests until the first job has waited max_wait."""
        first = self._jobs.popleft()
        jobs, rows = [first], first.inputs.rows
        deadline = first.enqueued_at + self.max_wait_s
        while rows < self.max_rows and not self._stopping:
            if self._jobs:
                if rows + self._jobs[0].inputs.rows > self.max_rows:
                    break
                job = self._jobs.popleft()
                jobs.append(job)
                rows += job.inputs.rows
                continue
            remaining = deadline - time.perf_counter()
            if self._expected == 0 or remaining <= 0:
                break
            self._ready.wait(remaining)
        return jobs


def _deliver(jobs: list[_Job], results: list[np.ndarray] | BaseException) -> None:
    """On the event loop: each request gets its scores (or the forward's exception)."""
    for index, job in enumerate(jobs):
        if job.future.done():  # the request was cancelled (client gone)
            continue
        if isinstance(results, BaseException):
            job.future.set_exception(results)
        else:
            job.future.set_result(results[index])


def _forward(jobs: list[_Job]) -> list[np.ndarray]:
    """Runs on the inference thread: one forward per policy and action table among the jobs (normally exactly
    one; a model scoring by features, one per distinct catalog: each campaign's ActionRows are cached, so the
    jobs of one catalog share its table)."""
    results: dict[int, np.ndarray] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault((id(job.policy), id(job.table)), []).append(index)
    for indices in groups.values():
        policy, table = jobs[indices[0]].policy, jobs[indices[0]].table
        inputs = ModelInputs.concatenate([jobs[i].inputs for i in indices])
        scores = policy.scores(inputs) if table is None else policy.scores(inputs, table)
        row = 0
        for i in indices:
            rows = jobs[i].inputs.rows
            results[i] = scores[row : row + rows]
            row += rows
    return [results[i] for i in range(len(jobs))]
