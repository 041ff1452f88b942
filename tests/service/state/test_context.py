"""The context format's batch append is the per-context append, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from service.state.context import append_step, append_steps_to, empty_context, new_step_bytes


def grown(steps: int, dim: int, capacity: int, rng: np.random.Generator) -> bytes | None:
    """A context built by `steps` appends (None for zero), with outcomes-like running values."""
    initial = empty_context(dim, float(rng.uniform(0, 50)), float(rng.uniform(0, 20)))
    raw: bytes | None = None
    for n in range(steps):
        step = new_step_bytes(f"d-{n}", int(rng.integers(0, 4)), rng.normal(size=dim).astype("<f4").tobytes())
        raw = append_step(raw, step, capacity, initial)
    return raw


@pytest.mark.parametrize("capacity", [0, 1, 3, 9])
def test_batch_append_equals_one_by_one(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    dim = 5
    initial = empty_context(dim, 41.5, 12.25)
    raws: list[bytes | None] = [grown(int(rng.integers(0, 12)), dim, capacity, rng) for _ in range(60)]
    raws += [
        None,
        b"",
        b"not a context",
        b'{"t": 3}',
        grown(3, dim + 2, capacity, rng),
    ]  # absent, unreadable, other dim
    steps = [
        new_step_bytes(f"d-new-{i}", int(rng.integers(0, 4)), rng.normal(size=dim).astype("<f4").tobytes())
        for i in range(len(raws))
    ]
    expected = [append_step(raw, step, capacity, initial) for raw, step in zip(raws, steps, strict=True)]
    assert append_steps_to(raws, steps, capacity, initial) == expected
    if capacity > 1:
        assert len({len(raw or b"") for raw in raws}) > 3  # contexts of several lengths, grouped
    assert append_steps_to([], [], capacity, initial) == []
