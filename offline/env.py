"""An offline simulation environment learned from logs (after Guo et al. 2024), for scoring
counterfactual actions and calibrating lambda when the true world is unknown.

- Responses: `ResponseModel` (expected reward and cost of every action) fitted on the logs, with the
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

from dataclasses import dataclass

import numpy as np

from offline.logs import Logs
from offline.response import ResponseConfig, ResponseModel

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
    t: int = 0


def _history_inputs(
    features: np.ndarray, coupons: np.ndarray, purchases: np.ndarray, face: np.ndarray, t: np.ndarray
) -> np.ndarray:
    extra = np.stack([coupons, purchases, face, np.minimum(t, 20) / 10.0], axis=1)
    return np.concatenate([features, extra], axis=1).astype(np.float32)


class LogEnvironment:
    def __init__(
        self, logs: Logs, response: ResponseModel, relative_face: np.ndarray, rounds: int, mean_positive_reward: float
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
    def fit(cls, logs: Logs, cfg: ResponseConfig | None = None, max_rounds: int = 64) -> LogEnvironment:
        num_actions = max(logs.num_actions, 2)
        mean_cost = np.array(
            [logs.cost[logs.action == a].mean() if np.any(logs.action == a) else 0.0 for a in range(num_actions)]
        )
        relative_face = mean_cost / mean_cost.max() if mean_cost.max() > 0 else mean_cost
        coupons, purchases, face, position = history_summaries(logs, relative_face)
        x = _history_inputs(logs.features, coupons, purchases, face, position)
        response = ResponseModel(x.shape[1], num_actions, cfg).fit(x, logs.action, logs.reward, logs.cost)
        rounds = int(min(np.diff(logs.user_slices()).max(), max_rounds))
        return cls(logs, response, relative_face, rounds, _mean_positive(logs.reward))

    @property
    def fit_metrics(self) -> dict[str, float]:
        return self.response.metrics

    def start(self, n: int | None = None, seed: int | None = None) -> LogEpisode:
        """N users drawn like the logs' users (all of them, in order, when N is the logs' user count)."""
        n_logged = self.logs.n_users
        n = n_logged if n is None else n
        if n == n_logged:
            users = np.arange(n_logged)
        else:
            users = np.random.default_rng(seed or 0).choice(n_logged, size=n, replace=n > n_logged)
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
        )

    def features(self, ep: LogEpisode) -> np.ndarray:
        return ep.features[ep.t]

    def expected_response(self, ep: LogEpisode) -> tuple[np.ndarray, np.ndarray]:
        x = _history_inputs(ep.features[ep.t], ep.coupons, ep.purchases, ep.face, np.full(len(ep.coupons), ep.t))
        reward, cost = self.response.predict(x)
        reward *= ep.active[ep.t][:, None]
        cost[:, 0] = 0.0  # no coupon costs nothing
        cost *= ep.active[ep.t][:, None]
        return np.clip(reward, 0.0, None), cost

    def step(self, ep: LogEpisode, actions: np.ndarray) -> StepOutcome:
        reward_all, cost_all = self.expected_response(ep)
        idx = np.arange(len(actions))
        reward, cost = reward_all[idx, actions], cost_all[idx, actions]
        bought = reward / self.mean_positive_reward
        ep.coupons = HISTORY_DECAY * ep.coupons + (actions > 0)
        ep.purchases = HISTORY_DECAY * ep.purchases + bought
        ep.face = HISTORY_DECAY * ep.face + self.relative_face[actions]
        ep.t += 1
        return StepOutcome(reward, cost, reward, cost)


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
