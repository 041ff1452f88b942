"""Causal forest two-stage baseline (the paper's Forest benchmark), on econml's generalized random forest.

Stage 1 estimates, for every coupon a >= 1, the uplift of reward and of cost over no coupon,
tau_a(x) = E[y | x, a] - E[y | x, 0], with `econml.grf.CausalForest` (the causal forest of Wager & Athey and
the generalized random forests of Athey, Tibshirani & Wager): one forest per outcome (reward, cost), with
the coupons as K - 1 one-hot treatments, so each forest solves the local moment equation
E[(y - <tau(x), T> - mu(x)) (T, 1) | x] = 0 and returns every coupon's uplift at once. Trees are honest (one
half of each subsample places the splits, the other half sets the leaf estimates). Under the randomised
logging of the training data the treatment is independent of x, which is what the plain (non-DML) forest
needs.

Stage 2 is the Lagrangian multiple-choice knapsack: argmax_a tau_r(a) - lambda tau_c(a), with 0 for
action 0 ("allocate a coupon only if its predicted effect is positive"). The chosen action's predicted
cost uplift falls with lambda, so spend does too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines._common import num_actions_of


@dataclass
class ForestConfig:
    n_estimators: int = 100
    min_samples_leaf: int = 50  # per leaf, on each honest half
    max_samples: float = 0.45  # per-tree subsample of the rows (econml's default)
    n_jobs: int = 2
    seed: int = 0


def _forest(cfg: ForestConfig) -> Any:
    """An unfitted `econml.grf.CausalForest` (imported here: econml takes seconds to import, and only the
    forest baseline needs it)."""
    from econml.grf import CausalForest as GeneralizedCausalForest

    return GeneralizedCausalForest(
        n_estimators=cfg.n_estimators,
        min_samples_leaf=cfg.min_samples_leaf,
        max_samples=cfg.max_samples,
        honest=True,
        inference=False,  # point estimates only: no confidence intervals needed to decide
        n_jobs=cfg.n_jobs,
        random_state=cfg.seed,
    )


class CausalForest(Policy):
    """Causal forests of the reward and cost uplift of every coupon + Lagrangian multiple-choice knapsack."""

    name = "forest"

    def __init__(self, reward: Any, cost: Any, num_actions: int) -> None:
        """`reward`, `cost`: fitted `econml.grf.CausalForest`s of the two outcomes."""
        self.reward_forest, self.cost_forest = reward, cost
        self.num_actions = num_actions

    @classmethod
    def fit(cls, logs: Logs, cfg: ForestConfig | None = None) -> CausalForest:
        cfg = cfg or ForestConfig()
        k = num_actions_of(logs)
        treatments = np.eye(k)[logs.action][:, 1:]  # [n, K - 1] one-hot coupon, all zero for no coupon
        forests = []
        for outcome in (logs.reward, logs.cost):
            forests.append(_forest(cfg).fit(logs.features, treatments, outcome))
        return cls(forests[0], forests[1], k)

    def uplift(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted uplift over no coupon [N, K] of reward and cost (column 0 is 0)."""
        n = features.shape[0]
        ur, uc = np.zeros((n, self.num_actions)), np.zeros((n, self.num_actions))
        ur[:, 1:] = self.reward_forest.predict(features)
        uc[:, 1:] = np.clip(self.cost_forest.predict(features), 0.0, None)
        return ur, uc

    def act(
        self, features: np.ndarray, t: int, lam: float, expected: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        ur, uc = self.uplift(features)
        return np.argmax(ur - lam * uc, axis=1)
