"""An offline simulation environment learned from logs (after Guo et al. 2024), for scoring
counterfactual actions and calibrating lambda when the true world is unknown.

- Responses: `OutcomeModel` (probability of a purchase and reward and cost given one, for every
  action) fitted on the logs, with the
  current features plus a summary of the user's own history as input: a decayed count of coupons given,
  a decayed count of purchases (reward > 0), the decayed face of recent coupons (mean logged cost of the
  action, relative to the largest) and the step index. So carry-over effects present in the logs
  (fatigue, habit, reference) are learned, and the simulated history reacts to the simulated actions.
- States: the logged feature sequences of sampled users are replayed (as AuctionNet's offline
  environment replays its logs). Bias: features do not react to the policy's actions; any effect of
  actions on later features is missed, only the history summary reacts. Outcomes are the expected
  values (a deterministic environment), which makes spend a smooth function of lambda.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from offline.logs import Logs
from offline.response import OutcomeModel, ResponseConfig

HISTORY_DECAY = 0.5


@dataclass
class StepOutcome:
    reward: np.ndarray
    cost: np.ndarray
    expected_reward: np.ndarray
    expected_cost: np.ndarray


@dataclass
class LogEpisode:
    features: np.ndarray  # [T, N, d] replayed features (last step repeated after a user's end)
    active: np.ndarray  # [T, N] the user is still in their logged trajectory
    coupons: np.ndarray  # [N] decayed coupon count
    purchases: np.ndarray  # [N] decayed purchase count
    face: np.ndarray  # [N] decayed relative face value
    uniforms: np.ndarray  # [T, N] common random numbers of the purchase draws
    t: int = 0


def response_features(
    features: np.ndarray, coupons: np.ndarray, purchases: np.ndarray, face: np.ndarray, t: np.ndarray
) -> np.ndarray:
    """What the response models read of a decision: its features, then the user's history summaries (decayed sums of
    coupons, purchases and relative face value) and the step index (capped at 20, over 10)."""
    extra = np.stack([coupons, purchases, face, np.minimum(t, 20) / 10.0], axis=1)
    return np.concatenate([features, extra], axis=1).astype(np.float32)


class LogEnvironment:
    def __init__(
        self, logs: Logs, response: OutcomeModel, relative_face: np.ndarray, rounds: int, mean_positive_reward: float
    ) -> None:
        self.logs = logs
        self.mean_positive_reward = mean_positive_reward
        self.response = response
        self.relative_face = relative_face
        self._rounds = rounds
        self._num_actions = response.num_actions
        self._starts = logs.user_slices()

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def num_actions(self) -> int:
        return self._num_actions

    @classmethod
    def fit(
        cls,
        logs: Logs,
        cfg: ResponseConfig | None = None,
        max_rounds: int = 64,
        *,
        seed: int | None = None,
        log: Callable[[str], None] | None = None,
        num_actions: int | None = None,
    ) -> LogEnvironment:
        """Fit the response model on `logs` (`seed`, if given, replaces `cfg.seed`); `log` is told of
        each stage and each epoch. `num_actions` (default: the logged actions') sizes the action space, so that
        policies with more actions than were logged can run in it; an action never logged has no learned
        response (`logged_actions`) and is for the policies to leave out."""
        cfg = replace(cfg or ResponseConfig(), **({} if seed is None else {"seed": seed}))
        if num_actions is not None and num_actions < logs.num_actions:
            raise ValueError(f"the logs hold action {logs.num_actions - 1}, beyond the {num_actions} actions asked for")
        num_actions = max(logs.num_actions, 2) if num_actions is None else num_actions
        mean_cost = np.array(
            [logs.cost[logs.action == a].mean() if np.any(logs.action == a) else 0.0 for a in range(num_actions)]
        )
        relative_face = mean_cost / mean_cost.max() if mean_cost.max() > 0 else mean_cost
        coupons, purchases, face, position = history_summaries(logs, relative_face)
        x = response_features(logs.features, coupons, purchases, face, position)
        if log is not None:
            log(f"fitting the response model on {logs.n_rows} rows ({num_actions} actions, up to {cfg.epochs} epochs)")
        response = OutcomeModel(x.shape[1], num_actions, cfg).fit(x, logs.action, logs.reward, logs.cost, log=log)
        rounds = int(min(np.diff(logs.user_slices()).max(), max_rounds))
        return cls(logs, response, relative_face, rounds, _mean_positive(logs.reward))

    @property
    def logged_actions(self) -> np.ndarray:
        """[K] bool: the actions the logs hold (the ones with a learned response); no coupon always counts."""
        out = np.bincount(self.logs.action, minlength=self._num_actions)[: self._num_actions] > 0
        out[0] = True
        return out

    @property
    def fit_metrics(self) -> dict[str, float]:
        return self.response.metrics

    def start(self, n: int | None = None, seed: int | None = None) -> LogEpisode:
        """N users drawn like the logs' users (all of them, in order, when N is the logs' user count), and
        the uniforms of their purchase draws; both depend on `seed` alone."""
        n_logged = self.logs.n_users
        n = n_logged if n is None else n
        rng = np.random.default_rng(seed or 0)
        users = np.arange(n_logged) if n == n_logged else rng.choice(n_logged, size=n, replace=n > n_logged)
        starts, T = self._starts, self._rounds
        lengths = np.minimum(starts[users + 1] - starts[users], T)
        steps = np.arange(T)
        active = steps[:, None] < lengths[None, :]
        rows = starts[users][None, :] + np.minimum(steps[:, None], lengths[None, :] - 1)
        return LogEpisode(
            features=self.logs.features[rows],
            active=active,
            coupons=np.zeros(n),
            purchases=np.zeros(n),
            face=np.zeros(n),
            uniforms=rng.random((T, n)),
        )

    def features(self, ep: LogEpisode) -> np.ndarray:
        return ep.features[ep.t]

    def _parts(self, ep: LogEpisode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(purchase), reward and cost given one [N, K] at the current step; zero for users past their end."""
        x = response_features(ep.features[ep.t], ep.coupons, ep.purchases, ep.face, np.full(len(ep.coupons), ep.t))
        p, reward, cost = self.response.predict_parts(x)
        p *= ep.active[ep.t][:, None]
        cost[:, 0] = 0.0  # no coupon costs nothing
        return p, reward, cost

    def expected_response(self, ep: LogEpisode) -> tuple[np.ndarray, np.ndarray]:
        p, reward, cost = self._parts(ep)
        return p * reward, p * cost

    def step(self, ep: LogEpisode, actions: np.ndarray) -> StepOutcome:
        p_all, reward_all, cost_all = self._parts(ep)
        idx = np.arange(len(actions))
        p, reward, cost = p_all[idx, actions], reward_all[idx, actions], cost_all[idx, actions]
        bought = ep.uniforms[ep.t] < p
        sampled_reward, sampled_cost = np.where(bought, reward, 0.0), np.where(bought, cost, 0.0)
        ep.coupons = HISTORY_DECAY * ep.coupons + (actions > 0)
        ep.purchases = HISTORY_DECAY * ep.purchases + sampled_reward / self.mean_positive_reward
        ep.face = HISTORY_DECAY * ep.face + self.relative_face[actions]
        ep.t += 1
        return StepOutcome(sampled_reward, sampled_cost, p * reward, p * cost)


def history_summaries(logs: Logs, relative_face: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: decayed coupon count, decayed purchase count and decayed face BEFORE this step, and the step."""
    n = logs.n_rows
    coupons, purchases, face = np.zeros(n), np.zeros(n), np.zeros(n)
    starts = logs.user_slices()
    position = np.arange(n) - np.repeat(starts[:-1], np.diff(starts))
    bought = logs.reward / _mean_positive(logs.reward)
    max_len = int(np.diff(starts).max())
    # walk step by step over all users at once (vectorised over users)
    for k in range(1, max_len):
        rows = np.flatnonzero(position == k)
        prev = rows - 1
        coupons[rows] = HISTORY_DECAY * coupons[prev] + (logs.action[prev] > 0)
        purchases[rows] = HISTORY_DECAY * purchases[prev] + bought[prev]
        face[rows] = HISTORY_DECAY * face[prev] + relative_face[logs.action[prev]]
    return coupons, purchases, face, position


def _mean_positive(reward: np.ndarray) -> float:
    """Mean reward of an interaction that brought any (one "purchase" in the history summary)."""
    positive = reward > 0
    return float(reward[positive].mean()) if positive.any() else 1.0
