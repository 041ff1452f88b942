"""The reference points every evaluation shows: random at equal spend, the plain two-stage model and the
perfect-information myopic oracle."""

from __future__ import annotations

import numpy as np

from offline.logs import Logs
from offline.response import ResponseConfig, ResponseModel
from offline.rollout import Policy


class RandomAtSpend(Policy):
    """A coupon with probability exp(-lambda) (uniform among coupons), else none: spend falls with lambda."""

    name = "random"

    def __init__(self, num_actions: int, seed: int = 0) -> None:
        self.num_actions = num_actions
        self.seed = seed

    def begin(self, n_users: int) -> None:
        self.rng = np.random.default_rng(self.seed)

    def act(self, features, t, lam, expected=None):
        n = features.shape[0]
        give = self.rng.random(n) < np.exp(-max(lam, 0.0))
        coupon = self.rng.integers(1, self.num_actions, size=n)
        return np.where(give, coupon, 0)


class MyopicOracle(Policy):
    """Per-step Lagrangian knapsack on the TRUE expected responses: argmax_a E[r|a] - lambda E[c|a].
    Knows everything about today, nothing about tomorrow."""

    name = "myopic-oracle"
    needs_oracle = True

    def act(self, features, t, lam, expected=None):
        assert expected is not None
        reward, cost = expected
        return np.argmax(reward - lam * cost, axis=1)


class TwoStage(Policy):
    """Stage 1: per-action reward and cost regressors on the current features. Stage 2: Lagrangian
    multiple-choice knapsack, argmax_a r_hat(a) - lambda c_hat(a)."""

    name = "two-stage"

    def __init__(self, model: ResponseModel) -> None:
        self.model = model

    @classmethod
    def fit(cls, logs: Logs, cfg: ResponseConfig | None = None) -> TwoStage:
        model = ResponseModel(logs.feature_dim, max(logs.num_actions, 2), cfg)
        model.fit(logs.features, logs.action, logs.reward, logs.cost)
        return cls(model)

    def act(self, features, t, lam, expected=None):
        reward, cost = self.model.predict(features)
        return np.argmax(reward - lam * cost, axis=1)
