"""Constrained-MDP baseline (Xiao et al. 2019): a policy trained for ONE fixed price of cost lambda0.

Training: fitted-Q iteration on the logged trajectories with the Lagrangian reward r - lambda0_eff c,
gamma = 1 over the finite horizon (the last logged step of a user is terminal). The state is the current
features plus a summary of the user's own history, which the policy keeps itself while it acts (previous
action, previous purchase, exponentially decayed purchase / coupon / coupon-value counts, the round
index): the carry-over effects a sequential method can exploit. The policy is greedy in Q.

Lambda scale: the paper's lambda0 in {0.25, 0.5, 0.75} prices *normalised* cost. Here revenue and cost
are normalised to unit mean per logged row, so lambda0 maps to lambda0_eff = lambda0 * mean(r) / mean(c)
(`_common.lambda_scale`; about 6.6 on the default synthetic world, giving 1.6 / 3.3 / 4.9).

Calibration knob: the model is trained at lambda0, so the `lam` passed to `act` does NOT re-price cost;
it moves a threshold on the coupon advantage instead. With a* = argmax_{a >= 1} Q(s, a), the policy
gives a* iff Q(s, a*) - Q(s, 0) > (lam - lambda0_eff) * c_bar (c_bar = mean redeemed coupon cost), else
no coupon. At lam = lambda0_eff this is exactly the trained greedy policy; the coupon set shrinks as
lam grows, so spend falls with it and budget calibration can bisect on lam like on every other method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines._common import (
    Standardizer,
    lambda_scale,
    mlp,
    num_actions_of,
    single_threaded,
    to_tensor,
)

DECAY = 0.5  # decay of the history summaries (a fixed feature choice, not the world's parameter)


@dataclass
class CMDPConfig:
    hidden: int = 64
    layers: int = 2
    iterations: int | None = None  # fitted-Q iterations; default: the logged horizon
    epochs_per_iteration: int = 1  # more epochs per iteration overfit the noisy max-targets here
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def coupon_values(logs: Logs) -> np.ndarray:
    """Face value of every action, read off the logs (a redeemed coupon costs its face value)."""
    k = num_actions_of(logs)
    return np.array([logs.cost[logs.action == a].max(initial=0.0) for a in range(k)])


class History:
    """Per-user history summary, updated step by step (the same code for logs and for acting)."""

    def __init__(self, n: int, num_actions: int, values: np.ndarray, horizon: int) -> None:
        self.k, self.values, self.horizon = num_actions, values, max(horizon - 1, 1)
        self.prev_action = np.zeros((n, num_actions), dtype=np.float32)
        self.prev_bought = np.zeros(n, dtype=np.float32)
        self.ema_bought = np.zeros(n, dtype=np.float32)
        self.ema_coupon = np.zeros(n, dtype=np.float32)
        self.ema_value = np.zeros(n, dtype=np.float32)
        self.has_prev = np.zeros(n, dtype=np.float32)

    @staticmethod
    def dim(num_actions: int) -> int:
        return num_actions + 6

    def summary(self, t: int | np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        n = self.prev_bought[rows].shape[0]
        tt = np.broadcast_to(np.asarray(t, dtype=np.float32) / self.horizon, (n,))
        return np.concatenate(
            [
                self.prev_action[rows],
                self.prev_bought[rows, None],
                self.ema_bought[rows, None],
                self.ema_coupon[rows, None],
                self.ema_value[rows, None],
                self.has_prev[rows, None],
                tt[:, None],
            ],
            axis=1,
        ).astype(np.float32)

    def update(self, actions: np.ndarray, reward: np.ndarray, rows: np.ndarray | slice = slice(None)) -> None:
        bought = (reward > 0).astype(np.float32)
        onehot = np.zeros((len(actions), self.k), dtype=np.float32)
        onehot[np.arange(len(actions)), actions] = 1.0
        self.prev_action[rows] = onehot
        self.prev_bought[rows] = bought
        self.ema_bought[rows] = DECAY * self.ema_bought[rows] + bought
        self.ema_coupon[rows] = DECAY * self.ema_coupon[rows] + (actions > 0)
        value = self.values[actions] / max(self.values.max(), 1e-9)
        self.ema_value[rows] = DECAY * self.ema_value[rows] + value
        self.has_prev[rows] = 1.0


def history_features(logs: Logs, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every logged row: the history summary before it, its position in the user's trajectory and
    whether it is the user's last logged step."""
    k = num_actions_of(logs)
    starts = logs.user_slices()
    position = np.arange(logs.n_rows) - starts[logs.user]
    last = np.zeros(logs.n_rows, dtype=bool)
    last[starts[1:] - 1] = True
    hist = History(logs.n_users, k, values, int(position.max()) + 1)
    out = np.zeros((logs.n_rows, History.dim(k)), dtype=np.float32)
    for p in range(int(position.max()) + 1):
        rows = np.flatnonzero(position == p)
        users = logs.user[rows]
        out[rows] = hist.summary(logs.t[rows], users)
        hist.update(logs.action[rows], logs.reward[rows], users)
    return out, position, last


class CMDP(Policy):
    def __init__(
        self,
        net: torch.nn.Module,
        scaler: Standardizer,
        values: np.ndarray,
        horizon: int,
        lam0: float,
        lam_eff: float,
        reward_scale: float,
        c_bar: float,
    ) -> None:
        self.net, self.scaler, self.values, self.horizon = net, scaler, values, horizon
        self.lam0, self.lam_eff, self.reward_scale, self.c_bar = lam0, lam_eff, reward_scale, c_bar
        self.num_actions = len(values)
        self.name = f"cmdp{round(lam0 * 100)}"
        self.begin(0)

    @classmethod
    @single_threaded
    def fit(cls, logs: Logs, lam0: float = 0.5, cfg: CMDPConfig | None = None) -> CMDP:
        cfg = cfg or CMDPConfig()
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        k = num_actions_of(logs)
        values = coupon_values(logs)
        lam_eff = lam0 * lambda_scale(logs)
        hist, position, last = history_features(logs, values)
        # ordinal t can differ from the position; the history summary uses the logged t
        states = np.concatenate([logs.features, hist], axis=1)
        scaler = Standardizer(states)
        s = to_tensor(scaler(states))
        nxt = np.minimum(np.arange(logs.n_rows) + 1, logs.n_rows - 1)
        lagr = logs.reward - lam_eff * logs.cost
        reward_scale = max(float(np.std(lagr)), 1e-6)
        r = to_tensor(lagr / reward_scale)
        not_last = to_tensor((~last).astype(np.float32))
        a = torch.from_numpy(logs.action.astype(np.int64))
        net = mlp(states.shape[1], cfg.hidden, cfg.layers, k)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        iterations = cfg.iterations or int(position.max()) + 1
        idx = np.arange(logs.n_rows)
        for _ in range(iterations):
            target_net = copy.deepcopy(net).eval()
            with torch.no_grad():
                q_all = torch.cat([target_net(s[i : i + 65536]) for i in range(0, len(s), 65536)])
                future = q_all.max(1).values
                y = r + not_last * future[torch.from_numpy(nxt)]
            net.train()
            for _ in range(cfg.epochs_per_iteration):
                rng.shuffle(idx)
                for i in range(0, len(idx), cfg.batch_size):
                    b = torch.from_numpy(idx[i : i + cfg.batch_size])
                    q = net(s[b]).gather(1, a[b, None]).squeeze(1)
                    loss = torch.nn.functional.smooth_l1_loss(q, y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        net.eval()
        c_bar = float(logs.cost[logs.cost > 0].mean()) if np.any(logs.cost > 0) else 1.0
        return cls(net, scaler, values, int(position.max()) + 1, lam0, lam_eff, reward_scale, c_bar)

    def begin(self, n_users: int) -> None:
        self.history = History(n_users, self.num_actions, self.values, self.horizon)
        self._last_actions: np.ndarray | None = None

    @torch.inference_mode()
    def q_values(self, features: np.ndarray, t: int) -> np.ndarray:
        """Q(s, a) [N, K] in revenue units (of the lambda0 Lagrangian)."""
        states = np.concatenate([features, self.history.summary(t)], axis=1)
        return self.net(to_tensor(self.scaler(states))).numpy().astype(np.float64) * self.reward_scale

    def act(self, features, t, lam, expected=None):
        q = self.q_values(features, t)
        best = 1 + np.argmax(q[:, 1:], axis=1)
        advantage = q[np.arange(len(q)), best] - q[:, 0]
        threshold = (lam - self.lam_eff) * self.c_bar
        return np.where(advantage > threshold, best, 0)

    def observe(self, actions: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> None:
        self.history.update(np.asarray(actions, dtype=np.int64), reward)
