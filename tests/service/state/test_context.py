"""The context format: appending steps, and the batch read equal to decoding each context."""

from __future__ import annotations

import numpy as np
import pytest

from service.state.context import append_step, decode_context, empty_context, gather, new_step_bytes


def grown(steps: int, dim: int, capacity: int, rng: np.random.Generator) -> bytes | None:
    """A context built by `steps` appends (None for zero), with outcomes-like running values."""
    initial = empty_context(dim, float(rng.uniform(0, 50)), float(rng.uniform(0, 20)))
    raw: bytes | None = None
    for n in range(steps):
        step = new_step_bytes(f"d-{n}", int(rng.integers(0, 4)), rng.normal(size=dim).astype("<f4").tobytes())
        raw = append_step(raw, step, capacity, initial)
    return raw


@pytest.mark.parametrize("capacity", [0, 1, 3])
def test_append_keeps_the_last_steps_and_starts_afresh_on_values_not_ours(capacity: int) -> None:
    dim, initial = 2, empty_context(2, 41.5, 12.25)
    raw: bytes | None = None
    for n in range(5):
        raw = append_step(raw, new_step_bytes(f"d-{n}", n, np.full(dim, n, "<f4").tobytes()), capacity, initial)
    view = decode_context(raw)
    assert view is not None and (view.t, view.rtg, view.ctg) == (5, 41.5, 12.25)
    kept = [f"d-{n}" for n in range(5)][5 - capacity :] if capacity else []
    assert view.decision_ids == kept and view.steps["t"].tolist() == [int(d[2:]) for d in kept]
    for foreign in (b"", b"not a context", grown(3, dim + 2, 9, np.random.default_rng(0))):
        fresh = decode_context(append_step(foreign, new_step_bytes("d-x", 1, b"\0" * 4 * dim), capacity, initial))
        assert fresh is not None and fresh.t == 1 and fresh.decision_ids == (["d-x"] if capacity else [])


@pytest.mark.parametrize("capacity", [0, 1, 3, 9])
def test_gather_reads_each_users_last_steps(capacity: int) -> None:
    """The batch read (contexts grouped by length) gives every user what decoding its context alone gives:
    the last `capacity` steps right-aligned, the running values, and a fresh start for values not ours."""
    rng = np.random.default_rng(10 + capacity)
    dim, initial_rtg, initial_ctg = 5, 41.5, 12.25
    raws: list[bytes | None] = [grown(int(rng.integers(0, 12)), dim, 9, rng) for _ in range(40)]
    foreign = grown(4, dim, 9, rng)
    assert foreign is not None
    raws += [
        None,
        b"",
        b"not a context",
        grown(3, dim + 2, 9, rng),  # another feature size
        bytes([2]) + foreign[1:],  # another format version, same length as ours
    ]
    batch = gather(raws, dim, capacity, initial_rtg, initial_ctg)
    assert batch.steps.shape == (len(raws), capacity)
    for i, raw in enumerate(raws):
        view = decode_context(raw) if i < 40 else None
        if view is None:
            assert (batch.counts[i], batch.t[i], batch.rtg[i], batch.ctg[i]) == (0, 0, np.float32(41.5), 12.25)
            assert not batch.steps[i].tobytes().strip(b"\0")
            continue
        kept = min(len(view.steps), capacity)
        assert (batch.counts[i], batch.t[i]) == (kept, view.t)
        assert (batch.rtg[i], batch.ctg[i]) == (np.float32(view.rtg), np.float32(view.ctg))
        assert batch.steps[i, capacity - kept :].tobytes() == view.steps[len(view.steps) - kept :].tobytes()
        assert not batch.steps[i, : capacity - kept].tobytes().strip(b"\0")
