"""The ablations' training hook: `train(..., batch_transform=...)` sees every training and validation batch,
and `zero_inputs` zeroes exactly the chosen conditioning inputs (targets untouched)."""

from __future__ import annotations

import math

import numpy as np
import torch

from offline.logs import Logs
from offline.train import TrainConfig, train
from offline.trajectories import Batch, build_trajectories, make_batch
from research.report import zero_inputs


def _batch(logs: Logs, objective: str = "dt-literal") -> Batch:
    traj = build_trajectories(logs, 4)
    windows = traj.windows()[:16]
    return make_batch(traj, windows, objective, np.linspace(0.1, 0.9, len(windows)), 100.0, 10.0, 64)


def test_zero_inputs_zeroes_only_the_chosen_inputs(tiny_logs: Logs) -> None:
    batch = _batch(tiny_logs)
    assert all(batch.input(name).abs().sum() > 0 for name in ("rtg", "ctg", "lam"))
    out = zero_inputs(rtg=False, ctg=True, lam=True)
    assert out is not None
    zeroed = out(batch)
    assert torch.equal(zeroed.input("rtg"), batch.input("rtg"))
    assert not zeroed.input("ctg").any() and not zeroed.input("lam").any()
    for name in ("states", "actions", "timesteps", "mask"):
        assert torch.equal(zeroed.input(name), batch.input(name)), name
    for name in ("taken", "loss_mask", "value_targets"):
        assert torch.equal(getattr(zeroed, name), getattr(batch, name)), name
    assert zero_inputs(False, False, False) is None


def test_train_applies_the_transform_to_every_batch(tiny_logs: Logs) -> None:
    cfg = TrainConfig(epochs=2, d_model=16, n_heads=2, context_length=4, batch_size=256, objective="dt-literal")
    seen: list[tuple[int, bool]] = []

    def record(batch: Batch) -> Batch:
        seen.append((batch.taken.shape[0], torch.is_grad_enabled()))
        return batch

    result = train(tiny_logs, cfg, progress=False, batch_transform=record)
    train_windows, val_windows = result.metrics["train_windows"], result.metrics["val_windows"]
    steps_per_epoch = math.ceil(train_windows * cfg.lambda_draws / cfg.batch_size)
    training = [n for n, grad in seen if grad]
    validation = [n for n, grad in seen if not grad]
    assert len(training) == cfg.epochs * steps_per_epoch
    assert sum(validation) == cfg.epochs * val_windows  # one validation pass per epoch, every window
