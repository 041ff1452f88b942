"""The decision helpers: right-aligned inputs from stored contexts, masking and priority."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_store import ModelStore
from service.engine import build_inputs, preferences
from service.state.base import NewStep
from service.state.memory import append_step


def test_build_inputs_right_aligns_each_users_context(model_store_dir: Path) -> None:
    m = ModelStore(model_store_dir).load().manifest
    dim, capacity = m.feature_dim, m.context_length - 1
    context = None
    for n in range(capacity + 3):  # more steps than fit: the oldest fall out
        feats = np.full(dim, n, "<f4").tobytes().hex()
        context = append_step(
            context, NewStep("u", f"d-{n}", n % m.num_actions, feats), capacity, m.initial_rtg, m.initial_ctg
        )
    assert context is not None
    context["g"] -= 1.5  # as if an outcome had arrived
    short = append_step(
        None, NewStep("v", "d-v", 1, np.full(dim, 7, "<f4").tobytes().hex()), capacity, m.initial_rtg, m.initial_ctg
    )
    current = np.arange(3 * dim, dtype=np.float32).reshape(3, dim)
    inputs = build_inputs(m, current, [context, short, None], lam=0.4)
    length = capacity + 1
    assert inputs.states.shape == (3, length, dim)
    np.testing.assert_array_equal(inputs.states[:, -1], current)
    assert inputs.mask[0].all() and inputs.mask[1].tolist() == [False] * (length - 2) + [True, True]
    assert inputs.mask[2].tolist() == [False] * (length - 1) + [True]
    assert inputs.states[0, 0, 0] == 3 and inputs.states[0, -2, 0] == capacity + 2
    assert inputs.timesteps[0].tolist() == list(range(3, capacity + 4))
    assert inputs.timesteps[1, -2:].tolist() == [0, 1] and inputs.timesteps[2, -1] == 0
    assert inputs.rtg[0, -1] == np.float32(m.initial_rtg - 1.5) and inputs.rtg[2, -1] == np.float32(m.initial_rtg)
    assert inputs.actions[1, -2] == 1 and inputs.states[1, -2, 0] == 7
    assert inputs.lam.tolist() == [np.float32(0.4)] * 3


def test_preferences_mask_unoffered_and_cut_after_no_coupon() -> None:
    scores = np.array(
        [
            [0.0, 3.0, 2.0, 1.0],  # best: 1 (not offered) -> 2, 3, then 0
            [1.0, 0.5, 2.0, 0.9],  # 2, then 0: 3 is below "no coupon"
            [5.0, 1.0, 2.0, 3.0],
        ],
        np.float32,
    )  # no coupon preferred
    prefs, priority = preferences(scores, [2, 3])
    assert prefs == [[2, 3, 0], [2, 0], [0]]
    assert priority.tolist() == [0, 1, 2]  # gain 2.0, 1.0, 0.0
