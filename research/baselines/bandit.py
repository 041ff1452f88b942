"""Thompson-sampling contextual bandit (Chapelle & Li 2011), budget-aware through lambda.

For every action a the bandit keeps two Bayesian linear regressions on a quadratic expansion phi(x) of
the standardised features: one for the reward and one for the cost (action 0 costs nothing). Each round
it draws, per user, one weight vector from every posterior and plays
argmax_a phi(x)·w_r(a) - lambda phi(x)·w_c(a), i.e. Thompson sampling on the Lagrangian reward
r - lambda c. Keeping reward and cost apart (rather than one posterior on r - lambda c) lets one
warm-started bandit serve every lambda, which calibration needs.

The posteriors are warm-started from the logs (Gaussian prior N(0, prior_var I), noise variance from
the least-squares residuals) and updated online from every `observe` during a rollout; `begin` goes back
to the warm start. Draws come from a generator reseeded in `begin`, so runs at different lambdas share
random numbers and, for the first round at least, a user's chosen cost falls with lambda.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines._common import Standardizer, num_actions_of


@dataclass
class BanditConfig:
    prior_var: float = 10.0
    posterior_scale: float = 1.0  # > 1 explores more (posterior inflation)
    quadratic: bool = True
    seed: int = 0


def _expand(z: np.ndarray, quadratic: bool) -> np.ndarray:
    cols = [np.ones((z.shape[0], 1)), z]
    if quadratic:
        i, j = np.triu_indices(z.shape[1])
        cols.append(z[:, i] * z[:, j])
    return np.concatenate(cols, axis=1).astype(np.float64)


class _Posterior:
    """Bayesian linear regression in natural parameters: precision P and P @ mean."""

    def __init__(self, p: int, prior_var: float, noise_var: float) -> None:
        self.precision = np.eye(p) / prior_var
        self.shift = np.zeros(p)
        self.noise_var = noise_var

    def update(self, phi: np.ndarray, y: np.ndarray) -> None:
        self.precision += phi.T @ phi / self.noise_var
        self.shift += phi.T @ y / self.noise_var

    def moments(self, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and a Cholesky factor of scale^2 * covariance."""
        cov = np.linalg.inv(self.precision)
        cov = (cov + cov.T) / 2
        mean = cov @ self.shift
        chol = np.linalg.cholesky(cov * scale**2 + 1e-12 * np.eye(len(mean)))
        return mean, chol

    def copy(self) -> _Posterior:
        out = _Posterior.__new__(_Posterior)
        out.precision, out.shift, out.noise_var = self.precision.copy(), self.shift.copy(), self.noise_var
        return out


class ThompsonBandit(Policy):
    name = "bandit"

    def __init__(
        self, scaler: Standardizer, reward_post: list[_Posterior], cost_post: list[_Posterior], cfg: BanditConfig
    ) -> None:
        self.scaler = scaler
        self.warm_reward, self.warm_cost = reward_post, cost_post
        self.cfg = cfg
        self.num_actions = len(reward_post)
        self.begin(0)

    @classmethod
    def fit(cls, logs: Logs, cfg: BanditConfig | None = None) -> ThompsonBandit:
        cfg = cfg or BanditConfig()
        scaler = Standardizer(logs.features)
        phi = _expand(scaler(logs.features), cfg.quadratic)
        k = num_actions_of(logs)
        reward_post, cost_post = [], []
        for a in range(k):
            m = logs.action == a
            posts = []
            for y in (logs.reward[m], logs.cost[m]):
                coef, *_ = np.linalg.lstsq(phi[m], y, rcond=None) if m.sum() else (np.zeros(phi.shape[1]),)
                resid = y - phi[m] @ coef if m.sum() else np.zeros(1)
                post = _Posterior(phi.shape[1], cfg.prior_var, max(float(np.var(resid)), 1e-6))
                if m.sum():
                    post.update(phi[m], y)
                posts.append(post)
            reward_post.append(posts[0])
            cost_post.append(posts[1])
        return cls(scaler, reward_post, cost_post, cfg)

    def begin(self, n_users: int) -> None:
        self.rng = np.random.default_rng(self.cfg.seed)
        self.reward_post = [p.copy() for p in self.warm_reward]
        self.cost_post = [p.copy() for p in self.warm_cost]
        self._refresh()
        self._last_phi: np.ndarray | None = None

    def _refresh(self) -> None:
        s = self.cfg.posterior_scale
        self._reward_moments = [p.moments(s) for p in self.reward_post]
        self._cost_moments = [p.moments(s) for p in self.cost_post]

    def _sample(self, phi: np.ndarray, moments: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """phi·w with one posterior draw of w per user."""
        mean, chol = moments
        z = self.rng.standard_normal((phi.shape[0], len(mean)))
        return phi @ mean + np.einsum("np,np->n", phi, z @ chol.T)

    def act(self, features, t, lam, expected=None):
        phi = _expand(self.scaler(features), self.cfg.quadratic)
        n = phi.shape[0]
        score = np.zeros((n, self.num_actions))
        for a in range(self.num_actions):
            r = self._sample(phi, self._reward_moments[a])
            c = np.clip(self._sample(phi, self._cost_moments[a]), 0.0, None) if a else np.zeros(n)
            score[:, a] = r - lam * c
        self._last_phi = phi
        return np.argmax(score, axis=1)

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        if self._last_phi is None:
            return
        for a in range(self.num_actions):
            m = actions == a
            if m.any():
                self.reward_post[a].update(self._last_phi[m], reward[m])
                self.cost_post[a].update(self._last_phi[m], cost[m])
        self._refresh()
        self._last_phi = None
