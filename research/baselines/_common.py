"""Small helpers shared by the learned baselines: feature scaling, MLPs, lambda scales read from logs,
and the doubly robust value of a (soft) decision under the uniform logging policy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from offline.logs import Logs


class Standardizer:
    """x -> (x - mean) / std with statistics of the training features."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(0).astype(np.float32)
        self.std = np.maximum(x.std(0), 1e-6).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std).astype(np.float32)


def mlp(input_dim: int, hidden: int, layers: int, output_dim: int) -> nn.Sequential:
    dims = [input_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in pairwise(dims):
        mods += [nn.Linear(a, b), nn.ReLU()]
    mods.append(nn.Linear(dims[-1], output_dim))
    return nn.Sequential(*mods)


def num_actions_of(logs: Logs) -> int:
    return max(logs.num_actions, 2)


def logged_propensity(logs: Logs) -> np.ndarray:
    """P(logged action) per row. `Logs` does not carry the `propensity` column, so the logging policy
    is taken to be uniform over the K actions (true for `simulate_logs` with behaviour_bias=0)."""
    return np.full(logs.n_rows, 1.0 / num_actions_of(logs))


def lambda_scale(logs: Logs) -> float:
    """mean(reward) / mean(cost) per logged row: the lambda at which one unit of normalised cost is worth
    one unit of normalised revenue. The paper's CMDP lambdas (0.25/0.5/0.75) are read on this scale."""
    return float(logs.reward.mean() / max(logs.cost.mean(), 1e-9))


def lambda_range(logs: Logs) -> tuple[float, float]:
    """Range of prices worth training end-to-end models on: from 0 to a price where, on the logged
    averages, no coupon pays for itself any more (twice the best incremental revenue per unit cost)."""
    k = num_actions_of(logs)
    r0 = logs.reward[logs.action == 0].mean() if np.any(logs.action == 0) else 0.0
    best = 0.0
    for a in range(1, k):
        m = logs.action == a
        if m.any() and logs.cost[m].mean() > 0:
            best = max(best, float((logs.reward[m].mean() - r0) / logs.cost[m].mean()))
    return 0.0, max(2.0 * best, 1.0)


def dr_value(
    policy_probs: torch.Tensor,
    baseline: torch.Tensor,
    action: torch.Tensor,
    outcome: torch.Tensor,
    propensity: torch.Tensor,
) -> torch.Tensor:
    """Doubly robust per-row value of a soft decision `policy_probs` [B, K]: the direct-method value
    under `baseline` [B, K] (detached predictions) plus the importance-weighted residual of the logged
    action. Its gradient w.r.t. `policy_probs` is unbiased for the true one under correct propensities."""
    rows = torch.arange(action.shape[0])
    direct = (policy_probs * baseline).sum(1)
    correction = policy_probs[rows, action] / propensity * (outcome - baseline[rows, action])
    return direct + correction


def to_tensor(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run small-network training on `n` intra-op threads (restored afterwards): for MLPs this size one
    thread is as fast as two on an idle machine and ~15x faster on a busy one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


F = TypeVar("F", bound=Callable[..., Any])


def single_threaded(fn: F) -> F:
    """Decorator: run `fn` under `torch_threads(1)`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch_threads(1):
            return fn(*args, **kwargs)

    return cast(F, wrapper)
