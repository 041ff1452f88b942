"""Causal forest two-stage baseline (the paper's benchmark, Athey & Wager).

Stage 1 estimates, for every coupon a >= 1, the uplift of reward and of cost over no coupon,
tau_a(x) = E[y | x, a] - E[y | x, 0], with an *honest* forest (Wager & Athey 2018):

- the rows logged with action 0 or a are split in two halves;
- on the splitting half each tree chooses its splits on the transformed outcome
  Z = y (W - e) / (e (1 - e)), W = [A = a], e = P(W = 1) (E[Z | x] = tau_a(x) under randomised logging),
  jointly for reward and cost (each scaled to unit variance);
- on the other half every leaf's estimate is re-computed as the difference in means treated - control
  of the rows falling in it (the causal-forest leaf estimate), so no row both places a split and sets
  the value it is judged by.

Stage 2 is the Lagrangian multiple-choice knapsack: argmax_a tau_r(a) - lambda tau_c(a), with 0 for
action 0 ("allocate a coupon only if its predicted effect is positive"). The chosen action's predicted
cost uplift falls with lambda, so spend does too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from offline.baselines._common import num_actions_of
from offline.logs import Logs
from offline.policy import Policy


@dataclass
class ForestConfig:
    n_estimators: int = 60
    min_samples_leaf: int = 100  # on the splitting half
    max_features: float = 0.7
    max_samples: float = 0.3  # per-tree subsample of the splitting half
    min_leaf_group: int = 5  # treated and control rows an estimation leaf needs, else the tree's own value
    n_jobs: int = 2
    seed: int = 0


class HonestUpliftForest:
    """Honest forest for the two-outcome uplift of one treatment against control."""

    def __init__(self, cfg: ForestConfig) -> None:
        self.cfg = cfg

    def fit(
        self, x: np.ndarray, w: np.ndarray, y: np.ndarray, e: float, rng: np.random.Generator
    ) -> HonestUpliftForest:
        """x [n, d], w [n] in {0, 1}, y [n, 2] (reward, cost), e = P(w = 1)."""
        cfg = self.cfg
        perm = rng.permutation(len(x))
        split, est = perm[: len(x) // 2], perm[len(x) // 2 :]
        self.y_scale = np.maximum(y.std(0), 1e-9)
        z = y * ((w - e) / (e * (1 - e)))[:, None] / self.y_scale
        self.forest = RandomForestRegressor(
            n_estimators=cfg.n_estimators,
            min_samples_leaf=cfg.min_samples_leaf,
            max_features=cfg.max_features,
            max_samples=cfg.max_samples,
            bootstrap=True,
            n_jobs=cfg.n_jobs,
            random_state=int(rng.integers(2**31 - 1)),
        ).fit(x[split], z[split])
        leaves = self.forest.apply(x[est])  # [n_est, trees]
        we, ye = w[est].astype(bool), y[est]
        self.tables: list[np.ndarray] = []
        for j, tree in enumerate(self.forest.estimators_):
            nodes = tree.tree_.node_count
            leaf = leaves[:, j]
            table = tree.tree_.value[:, :, 0] * self.y_scale  # fallback: the splitting half's estimate
            n_t = np.bincount(leaf[we], minlength=nodes)
            n_c = np.bincount(leaf[~we], minlength=nodes)
            ok = (n_t >= cfg.min_leaf_group) & (n_c >= cfg.min_leaf_group)
            for k in range(2):
                s_t = np.bincount(leaf[we], weights=ye[we, k], minlength=nodes)
                s_c = np.bincount(leaf[~we], weights=ye[~we, k], minlength=nodes)
                diff = s_t / np.maximum(n_t, 1) - s_c / np.maximum(n_c, 1)
                table[:, k] = np.where(ok, diff, table[:, k])
            self.tables.append(table)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Uplift [n, 2] (reward, cost)."""
        leaves = self.forest.apply(x)
        out = np.zeros((len(x), 2))
        for j, table in enumerate(self.tables):
            out += table[leaves[:, j]]
        return out / len(self.tables)


class CausalForest(Policy):
    """Per-coupon honest uplift forests for reward and cost + Lagrangian multiple-choice knapsack."""

    name = "forest"

    def __init__(self, forests: list[HonestUpliftForest], num_actions: int) -> None:
        self.forests = forests  # one per coupon 1..K-1
        self.num_actions = num_actions

    @classmethod
    def fit(cls, logs: Logs, cfg: ForestConfig | None = None) -> CausalForest:
        cfg = cfg or ForestConfig()
        rng = np.random.default_rng(cfg.seed)
        k = num_actions_of(logs)
        y = np.stack([logs.reward, logs.cost], axis=1)
        forests = []
        for a in range(1, k):
            rows = np.flatnonzero((logs.action == 0) | (logs.action == a))
            w = (logs.action[rows] == a).astype(np.float64)
            # P(W = 1 | A in {0, a}): constant under the (uniform) randomised logging policy
            e = float(np.clip(w.mean(), 0.05, 0.95)) if len(rows) else 0.5
            forests.append(HonestUpliftForest(cfg).fit(logs.features[rows], w, y[rows], e, rng))
        return cls(forests, k)

    def uplift(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted uplift over no coupon [N, K] of reward and cost (column 0 is 0)."""
        n = features.shape[0]
        ur, uc = np.zeros((n, self.num_actions)), np.zeros((n, self.num_actions))
        for a, forest in enumerate(self.forests, start=1):
            pred = forest.predict(features)
            ur[:, a], uc[:, a] = pred[:, 0], np.clip(pred[:, 1], 0.0, None)
        return ur, uc

    def act(self, features, t, lam, expected=None):
        ur, uc = self.uplift(features)
        return np.argmax(ur - lam * uc, axis=1)
