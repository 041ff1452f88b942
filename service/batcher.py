"""The micro-batcher: coalesce concurrent requests into one forward on ONE inference thread.

A lone request is flushed at once; the batcher only waits (at most `max_wait`) while other requests
are known to be on their way (announced with `expect()` while they read their contexts), and rows that
arrive while a forward runs are naturally batched into the next one. The queue is bounded: a full queue
raises `BatcherOverloaded` (the route answers 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy, PolicyInputs

log = logging.getLogger("saco.service.batcher")


class BatcherOverloaded(RuntimeError):
    pass


class Ticket:
    """A request announced to the batcher; closed once its rows are queued (or it gave up)."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher: MicroBatcher | None = batcher
        batcher._expected += 1

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher._expected -= 1
            self._batcher = None


@dataclass
class _Job:
    policy: LoadedPolicy
    inputs: PolicyInputs
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self, *, max_rows: int, max_wait_s: float, queue_size: int, threads: int, metrics: ServiceMetrics
    ) -> None:
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._carry: _Job | None = None
        self._expected = 0
        self._threads = threads
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="saco-inference", initializer=self._init_thread
        )
        self._task: asyncio.Task[None] | None = None
        self._metrics = metrics

    def _init_thread(self) -> None:
        torch.set_num_threads(self._threads)

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)  # warm the thread
        self._task = asyncio.create_task(self._run(), name="saco-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(BatcherOverloaded("service is shutting down"))
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def expect(self) -> Iterator[Ticket]:
        """Announce a request that will submit rows soon (the batcher may wait for it until it does)."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            ticket.close()

    async def scores(self, policy: LoadedPolicy, inputs: PolicyInputs, ticket: Ticket | None = None) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(policy, inputs, future))
        except asyncio.QueueFull:
            self._metrics.overloaded.inc()
            raise BatcherOverloaded("inference queue is full") from None
        finally:
            if ticket is not None:
                ticket.close()
        return await future

    async def _next_batch(self) -> list[_Job]:
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs, rows = [first], first.inputs.rows
        deadline = first.enqueued_at + self.max_wait_s
        while rows < self.max_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if self._expected == 0 or remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if rows + job.inputs.rows > self.max_rows:
                self._carry = job
                break
            jobs.append(job)
            rows += job.inputs.rows
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            started = time.perf_counter()
            for job in jobs:
                self._metrics.queue_wait.observe(started - job.enqueued_at)
            try:
                results = await loop.run_in_executor(self._executor, _forward, jobs)
            except Exception as exc:
                log.exception("inference failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._metrics.batch_rows.observe(sum(job.inputs.rows for job in jobs))
            self._metrics.inference_seconds.observe(time.perf_counter() - started)
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)


def _forward(jobs: list[_Job]) -> list[np.ndarray]:
    """Runs on the inference thread: one forward per policy among the jobs (normally exactly one)."""
    results: dict[int, np.ndarray] = {}
    by_policy: dict[int, list[int]] = {}
    for index, job in enumerate(jobs):
        by_policy.setdefault(id(job.policy), []).append(index)
    for indices in by_policy.values():
        policy = jobs[indices[0]].policy
        scores = policy.scores(PolicyInputs.concatenate([jobs[i].inputs for i in indices]))
        row = 0
        for i in indices:
            rows = jobs[i].inputs.rows
            results[i] = scores[row : row + rows]
            row += rows
    return [results[i] for i in range(len(jobs))]
