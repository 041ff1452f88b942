"""The context format: appending steps, and the batch read equal to decoding each context."""

from __future__ import annotations

import numpy as np
import pytest

from service.state.context import (
    ARRAY_ROWS,
    append_step,
    append_steps,
    apply_outcome,
    decode_context,
    empty_context,
    gather,
    new_step_bytes,
    new_steps,
)


def grown(steps: int, dim: int, capacity: int, rng: np.random.Generator) -> bytes | None:
    """A context built by `steps` appends (None for zero), each step's outcome applied."""
    initial = empty_context(dim)
    raw: bytes | None = None
    for n in range(steps):
        step = new_step_bytes(f"d-{n}", int(rng.integers(0, 4)), rng.normal(size=dim).astype("<f4").tobytes())
        raw = append_step(raw, step, capacity, initial)
        raw = apply_outcome(raw, f"d-{n}", int(rng.integers(-500, 5000)), int(rng.integers(0, 900)))
    return raw


@pytest.mark.parametrize("capacity", [0, 1, 3])
def test_append_keeps_the_last_steps_and_starts_afresh_on_values_not_ours(capacity: int) -> None:
    dim, initial = 2, empty_context(2)
    raw: bytes | None = None
    for n in range(5):
        raw = append_step(raw, new_step_bytes(f"d-{n}", n, np.full(dim, n, "<f4").tobytes()), capacity, initial)
        if n == 0:  # trimmed by the later steps where capacity is small: its outcome still counts
            raw = apply_outcome(raw, "d-0", 1250, 300)
    view = decode_context(raw)
    assert view is not None and (view.t, view.reward, view.cost) == (5, 1250, 300)
    kept = [f"d-{n}" for n in range(5)][5 - capacity :] if capacity else []
    assert view.decision_ids == kept and view.steps["t"].tolist() == [int(d[2:]) for d in kept]
    for foreign in (b"", b"not a context", grown(3, dim + 2, 9, np.random.default_rng(0))):
        fresh = decode_context(append_step(foreign, new_step_bytes("d-x", 1, b"\0" * 4 * dim), capacity, initial))
        assert fresh is not None and fresh.t == 1 and fresh.decision_ids == (["d-x"] if capacity else [])


@pytest.mark.parametrize("capacity", [0, 1, 3, 9])
@pytest.mark.parametrize("users", [1, ARRAY_ROWS - 1, 3 * ARRAY_ROWS])
def test_the_batch_append_equals_appending_each_step(capacity: int, users: int) -> None:
    """`append_steps` (array operations from ARRAY_ROWS contexts of one length) gives every user what
    `append_step` gives: contexts of mixed lengths, absent ones and values not ours alike."""
    rng = np.random.default_rng(capacity * 100 + users)
    dim, initial = 3, empty_context(3)
    kinds = [None, b"not a context", grown(2, dim + 1, 9, rng)]
    raws = [grown(int(rng.integers(0, 12)), dim, capacity, rng) if i % 2 else kinds[i % 3] for i in range(users)]
    for round_ in range(3):
        ids = [f"d-{round_}-{i}" for i in range(users)]
        actions = [int(a) for a in rng.integers(0, 4, size=users)]
        features = rng.normal(size=(users, dim)).astype("<f4").tobytes()
        row = 4 * dim
        steps = [new_step_bytes(ids[i], actions[i], features[i * row : (i + 1) * row]) for i in range(users)]
        rows = new_steps(ids, actions, features)
        assert [row.tobytes() for row in rows] == steps
        expected = [append_step(raw, step, capacity, initial) for raw, step in zip(raws, steps, strict=True)]
        assert append_steps(raws, rows, capacity, initial) == expected
        raws = list(expected)


@pytest.mark.parametrize("capacity", [0, 1, 3, 9])
def test_gather_reads_each_users_last_steps(capacity: int) -> None:
    """The batch read (contexts grouped by length) gives every user what decoding its context alone gives:
    the last `capacity` steps right-aligned, the running values, and a fresh start for values not ours."""
    rng = np.random.default_rng(10 + capacity)
    dim = 5
    raws: list[bytes | None] = [grown(int(rng.integers(0, 12)), dim, 9, rng) for _ in range(40)]
    foreign = grown(4, dim, 9, rng)
    assert foreign is not None
    raws += [
        None,
        b"",
        b"not a context",
        grown(3, dim + 2, 9, rng),  # another feature size
        bytes([1]) + foreign[1:],  # another format version, same length as ours
    ]
    batch = gather(raws, dim, capacity)
    assert batch.steps.shape == (len(raws), capacity)
    for i, raw in enumerate(raws):
        view = decode_context(raw) if i < 40 else None
        if view is None:
            assert (batch.counts[i], batch.t[i], batch.reward[i], batch.cost[i]) == (0, 0, 0, 0)
            assert not batch.steps[i].tobytes().strip(b"\0")
            continue
        kept = min(len(view.steps), capacity)
        assert (batch.counts[i], batch.t[i]) == (kept, view.t)
        assert (batch.reward[i], batch.cost[i]) == (view.reward, view.cost)
        assert batch.steps[i, capacity - kept :].tobytes() == view.steps[len(view.steps) - kept :].tobytes()
        assert not batch.steps[i, : capacity - kept].tobytes().strip(b"\0")
