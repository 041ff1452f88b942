"""The micro-batcher: coalescing gives the same scores as one forward per request, and a full queue
refuses work instead of growing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from contract.inputs import ModelInputs
from service.batcher import BatcherOverloaded, MicroBatcher
from service.metrics import ServiceMetrics
from service.policy import LoadedPolicy, load_policy


def random_inputs(policy: LoadedPolicy, rows: int, length: int, seed: int) -> ModelInputs:
    m = policy.manifest
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, length), np.bool_)
    mask[0, : length - 1] = False  # a first-step user among them
    return ModelInputs(
        states=rng.normal(size=(rows, length, m.feature_dim)).astype(np.float32),
        actions=rng.integers(0, m.num_actions, size=(rows, length)),
        rtg=rng.uniform(0, m.initial_rtg, size=(rows, length)).astype(np.float32),
        ctg=rng.uniform(0, m.initial_ctg, size=(rows, length)).astype(np.float32),
        timesteps=np.tile(np.arange(length), (rows, 1)),
        lam=rng.uniform(0, 1, size=rows).astype(np.float32),
        mask=mask,
    )


@pytest.fixture
def policy(model_store_dir: Path) -> LoadedPolicy:
    return load_policy(str(model_store_dir), "cpu")


def test_coalesced_forward_equals_separate_forwards(policy: LoadedPolicy) -> None:
    jobs = [
        random_inputs(policy, rows, length, seed)
        for seed, (rows, length) in enumerate([(1, 1), (3, 4), (16, policy.manifest.context_length), (2, 2)])
    ]
    separate = [policy.scores(inputs) for inputs in jobs]

    async def main() -> tuple[list[np.ndarray], ServiceMetrics]:
        metrics = ServiceMetrics()
        batcher = MicroBatcher(max_rows=64, max_wait_s=0.002, queue_size=16, threads=1, metrics=metrics)
        await batcher.start()
        try:
            tickets = [batcher.expect().__enter__() for _ in jobs]
            results = await asyncio.gather(
                *(batcher.scores(policy, inputs, ticket) for inputs, ticket in zip(jobs, tickets, strict=True))
            )
        finally:
            await batcher.stop()
        return list(results), metrics

    results, metrics = asyncio.run(main())
    for got, want in zip(results, separate, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    forwards = metrics.registry.get_sample_value("saco_batch_rows_count")
    assert forwards is not None and forwards < len(jobs)  # they were coalesced


def test_full_queue_refuses(policy: LoadedPolicy) -> None:
    async def main() -> list[object]:
        batcher = MicroBatcher(max_rows=4, max_wait_s=0.0, queue_size=2, threads=1, metrics=ServiceMetrics())
        await batcher.start()
        try:
            calls = [batcher.scores(policy, random_inputs(policy, 4, 2, i)) for i in range(8)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, BatcherOverloaded)]
    served = [r for r in results if isinstance(r, np.ndarray)]
    assert refused and served and len(refused) + len(served) == 8


def test_a_failing_forward_answers_its_requests_and_the_thread_serves_on(policy: LoadedPolicy) -> None:
    good = random_inputs(policy, 2, 3, seed=1)
    bad = ModelInputs(**{**good.__dict__, "states": good.states[:, :, :-1]})  # one feature short

    async def main() -> tuple[BaseException | np.ndarray, np.ndarray]:
        batcher = MicroBatcher(max_rows=64, max_wait_s=0.0, queue_size=4, threads=1, metrics=ServiceMetrics())
        await batcher.start()
        try:
            failed = await asyncio.gather(batcher.scores(policy, bad), return_exceptions=True)
            return failed[0], await batcher.scores(policy, good)
        finally:
            await batcher.stop()

    failed, served = asyncio.run(main())
    assert isinstance(failed, RuntimeError)
    np.testing.assert_allclose(served, policy.scores(good), rtol=1e-5, atol=1e-5)
