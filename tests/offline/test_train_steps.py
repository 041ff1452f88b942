"""Training's step schedule and action space at their edges: any total number of steps trains (a one-step
warm-up once divided by zero), and a model may have more actions than the logs hold."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from offline.logs import Logs, validate_table
from offline.train import TrainConfig, one_cycle, train
from research.simulate import simulate_logs
from research.world import WorldConfig


@pytest.fixture(scope="module")
def logs() -> Logs:
    return validate_table(simulate_logs(WorldConfig(users=120, rounds=3, seed=4)))


@pytest.mark.parametrize("total", range(1, 41))
def test_every_total_step_count_has_a_schedule(total: int) -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = one_cycle(optimizer, 1e-3, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(math.isfinite(r) and 0 < r <= 1e-3 * (1 + 1e-9) for r in rates), rates
    assert max(rates) >= 0.5e-3  # the cycle reaches (about) its top: no step count trains at ~0 only


def test_ten_steps_train(logs: Logs) -> None:
    """2 epochs x 5 steps: the step count of `saco retrain --epochs 2` on 788 training users."""
    probe = train(logs, TrainConfig(epochs=1, batch_size=1 << 20), progress=False)
    windows = int(probe.metrics["train_windows"])
    batch = math.ceil(windows / 5)
    assert math.ceil(windows / batch) == 5
    result = train(logs, TrainConfig(epochs=2, batch_size=batch), progress=False)
    assert result.metrics["epochs_run"] == 2 and math.isfinite(result.metrics["val_loss"])


def test_the_action_space_may_be_wider_than_the_logs(logs: Logs) -> None:
    few = dataclasses.replace(logs, action=np.minimum(logs.action, 1))  # only "no coupon" and coupon 1 logged
    assert few.num_actions == 2
    assert train(few, TrainConfig(epochs=1), progress=False).model.cfg.num_actions == 2
    assert train(few, TrainConfig(epochs=1, num_actions=4), progress=False).model.cfg.num_actions == 4
    with pytest.raises(ValueError, match="the logs hold action 3, beyond the 2 actions"):
        train(logs, TrainConfig(epochs=1, num_actions=2), progress=False)


def test_a_step_budget_ends_training_within_an_epoch(logs: Logs) -> None:
    probe = train(logs, TrainConfig(epochs=1, batch_size=1 << 20), progress=False)
    batch = math.ceil(int(probe.metrics["train_windows"]) / 5)  # 5 steps an epoch
    result = train(logs, TrainConfig(max_steps=7, batch_size=batch), progress=False)
    assert result.metrics["steps"] == 7 and result.metrics["epochs_run"] == 2
    assert math.isfinite(result.metrics["val_loss"])
