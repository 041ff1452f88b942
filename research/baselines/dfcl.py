"""Decision-focused causal learning (DFCL, Zhou et al. KDD 2024).

A response network (reward and cost per action, `_uplift_net.ResponseNet`) is first fitted by squared
error, then trained end-to-end on the *decision loss*: for a price lambda drawn per row from a range of
prices, the soft decision pi(a | x, lambda) = softmax_a((r_hat(a) - lambda c_hat(a)) / tau) is scored
by its doubly robust Lagrangian value on the logged outcome y = r - lambda c,

    V = sum_a pi(a) m(a) + pi(A) / p(A) (y - m(A)),   m = the frozen pre-trained predictions,

with p the logging propensity (uniform 1/K: `Logs` carries no propensity column). The loss is -V plus
`mse_weight` times the prediction loss (which keeps the heads calibrated across lambdas, as DFCL's
combined objective does). Deciding is the Lagrangian knapsack argmax_a r_hat(a) - lambda c_hat(a), so
spend falls with lambda.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines import _uplift_net as un
from research.baselines._common import (
    dr_value,
    lambda_range,
    logged_propensity,
    num_actions_of,
    single_threaded,
    to_tensor,
)


@dataclass
class DFCLConfig:
    net: un.NetConfig = field(default_factory=un.NetConfig)
    epochs: int = 6
    lr: float = 1e-3
    temperature: float = 0.1  # softmax temperature, in units of the reward's standard deviation
    mse_weight: float = 0.5


class DFCL(Policy):
    name = "dfcl"

    def __init__(self, net: un.ResponseNet, scaler: un.Standardizer) -> None:
        self.net, self.scaler = net, scaler

    @classmethod
    @single_threaded
    def fit(cls, logs: Logs, cfg: DFCLConfig | None = None) -> DFCL:
        cfg = cfg or DFCLConfig()
        rng = np.random.default_rng(cfg.net.seed)
        k = num_actions_of(logs)
        net, scaler = un.build(logs, k, cfg.net)
        x, a, r, c = un.tensors(logs, scaler)
        un.pretrain(net, x, a, r, c, cfg.net, rng)
        frozen = copy.deepcopy(net).eval()
        prop = to_tensor(logged_propensity(logs))
        lo, hi = lambda_range(logs)
        tau = cfg.temperature * float(net.y_scale[0])
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.net.weight_decay)
        idx = np.arange(logs.n_rows)
        net.train()
        for _ in range(cfg.epochs):
            rng.shuffle(idx)
            for i in range(0, len(idx), cfg.net.batch_size):
                b = torch.from_numpy(idx[i : i + cfg.net.batch_size])
                lam = to_tensor(rng.uniform(lo, hi, size=len(b)))[:, None]
                pr, pc = net(x[b])
                with torch.no_grad():
                    mr, mc = frozen(x[b])
                pi = torch.softmax((pr - lam * pc) / tau, dim=1)
                y = r[b] - lam[:, 0] * c[b]
                value = dr_value(pi, mr - lam * mc, a[b], y, prop[b]).mean() / net.y_scale[0]
                loss = -value + cfg.mse_weight * un.mse_on_logged(net, x[b], a[b], r[b], c[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        return cls(net, scaler)

    def act(self, features, t, lam, expected=None):
        reward, cost = un.predict(self.net, self.scaler, features)
        return np.argmax(reward - lam * cost, axis=1)
