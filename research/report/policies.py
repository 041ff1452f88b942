"""Policy wrappers used while scoring: wall-time accounting and a budget knob for lambda-blind policies."""

from __future__ import annotations

import time

import numpy as np

from offline.rollout import Policy


class Timed(Policy):
    """Delegates to a policy; accumulates the wall time of `act` and the decisions it made."""

    def __init__(self, inner: Policy) -> None:
        self.inner, self.name, self.needs_oracle = inner, inner.name, inner.needs_oracle
        self.seconds, self.decisions = 0.0, 0

    def begin(self, n_users: int) -> None:
        self.inner.begin(n_users)

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.act(features, t, lam, expected)
        self.seconds += time.perf_counter() - start
        self.decisions += len(out)
        return out

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        self.inner.observe(actions, reward, cost)

    @property
    def ms_per_1k(self) -> float:
        return 1000.0 * self.seconds / max(self.decisions, 1) * 1000.0


class BudgetKnob(Policy):
    """lambda <= split goes to the model; beyond it, coupons are withheld from a fixed random subset of
    users (kept with probability exp(-(lambda - split))): spend can then always be brought under a budget."""

    def __init__(self, inner: Policy, split: float, seed: int = 0) -> None:
        self.inner, self.split, self.seed = inner, split, seed
        self.name, self.needs_oracle = inner.name, inner.needs_oracle
        self.u = np.zeros(0)

    def begin(self, n_users: int) -> None:
        self.inner.begin(n_users)
        self.u = np.random.default_rng(self.seed).random(n_users)

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        actions = self.inner.act(features, t, min(lam, self.split), expected)
        keep = self.u < np.exp(-max(lam - self.split, 0.0))
        return np.where(keep, actions, 0)

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        self.inner.observe(actions, reward, cost)
