"""End-to-end budget allocation with a marketing-goal regularizer (Yan et al. 2023, "An End-to-End
Framework for Marketing Effectiveness Optimization under Budget Constraint").

The response network (`_uplift_net.ResponseNet`) is trained on prediction loss + beta * regularizer,
where the regularizer is minus the marketing goal reached by the allocation the model itself would make:

1. a budget level rho ~ U(rho_lo, rho_hi) (fraction of the spend of giving everyone their predicted
   revenue-maximising coupon) is drawn per mini-batch, and the price lambda_B at which the model's own
   knapsack spends it is found by bisection on the predictions;
2. the allocation is the hard argmax_a s(a), s = r_hat - lambda_B c_hat, so the goal is piecewise
   constant in the model; its gradient is *estimated* by Gaussian perturbation (Berthet et al. 2020):
   grad_s E[G(argmax(s + sigma Z))] = E[(G - baseline) Z] / sigma, with G the per-user doubly robust
   value of the decision on the logged outcome r - lambda_B c (uniform logging propensity 1/K);
3. the surrogate -sum(s * grad.detach()) carries that estimate into the network.

Deciding is the Lagrangian knapsack argmax_a r_hat(a) - lambda c_hat(a), so spend falls with lambda.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from offline.logs import Logs
from offline.rollout import Policy
from research.baselines import _uplift_net as un
from research.baselines._common import lambda_range, logged_propensity, num_actions_of, single_threaded, to_tensor


@dataclass
class RegularizerConfig:
    net: un.NetConfig = field(default_factory=un.NetConfig)
    epochs: int = 6
    lr: float = 1e-3
    beta: float = 1.0  # weight of the marketing-goal regularizer
    sigma: float = 0.1  # perturbation scale, in units of the reward's standard deviation
    samples: int = 8  # perturbation samples per row
    budget_range: tuple[float, float] = (0.1, 0.9)


def _price_for_budget(pr: torch.Tensor, pc: torch.Tensor, rho: float, hi: float, steps: int = 25) -> float:
    """Smallest lambda in [0, hi] at which the knapsack on (pr, pc) spends at most rho * its lambda=0 spend."""
    rows = torch.arange(len(pr))
    full = float(pc[rows, (pr).argmax(1)].sum())
    lo_l, hi_l = 0.0, hi
    for _ in range(steps):
        mid = (lo_l + hi_l) / 2
        spend = float(pc[rows, (pr - mid * pc).argmax(1)].sum())
        if spend > rho * full:
            lo_l = mid
        else:
            hi_l = mid
    return hi_l


class BudgetRegularizer(Policy):
    name = "regularizer"

    def __init__(self, net: un.ResponseNet, scaler: un.Standardizer) -> None:
        self.net, self.scaler = net, scaler

    @classmethod
    @single_threaded
    def fit(cls, logs: Logs, cfg: RegularizerConfig | None = None) -> BudgetRegularizer:
        cfg = cfg or RegularizerConfig()
        rng = np.random.default_rng(cfg.net.seed)
        gen = torch.Generator().manual_seed(cfg.net.seed)
        k = num_actions_of(logs)
        net, scaler = un.build(logs, k, cfg.net)
        x, a, r, c = un.tensors(logs, scaler)
        un.pretrain(net, x, a, r, c, cfg.net, rng)
        frozen = copy.deepcopy(net).eval()
        prop = to_tensor(logged_propensity(logs))
        hi = 2.0 * lambda_range(logs)[1]
        sigma = cfg.sigma * float(net.y_scale[0])
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.net.weight_decay)
        idx = np.arange(logs.n_rows)
        net.train()
        for _ in range(cfg.epochs):
            rng.shuffle(idx)
            for i in range(0, len(idx), cfg.net.batch_size):
                b = torch.from_numpy(idx[i : i + cfg.net.batch_size])
                pr, pc = net(x[b])
                with torch.no_grad():
                    lam = _price_for_budget(pr, pc.clamp(min=0), float(rng.uniform(*cfg.budget_range)), hi)
                    mr, mc = frozen(x[b])
                    m = mr - lam * mc  # [B, K] direct-method values
                    rows = torch.arange(len(b))
                    resid = (r[b] - lam * c[b] - m[rows, a[b]]) / prop[b]  # IPW residual of the logged action
                    s = pr - lam * pc
                    z = torch.randn((cfg.samples, *s.shape), generator=gen)
                    d = (s[None] + sigma * z).argmax(2)  # [M, B] perturbed decisions
                    g_val = m.gather(1, d.T).T + (d == a[b][None]).float() * resid[None]  # [M, B]
                    g_val = g_val - g_val.mean(0, keepdim=True)
                    grad = (g_val[..., None] * z).mean(0) / sigma  # [B, K] estimated d goal / d s
                goal_surrogate = (s * grad).sum(1).mean() / net.y_scale[0]
                loss = un.mse_on_logged(net, x[b], a[b], r[b], c[b]) - cfg.beta * goal_surrogate
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        return cls(net, scaler)

    def act(self, features, t, lam, expected=None):
        reward, cost = un.predict(self.net, self.scaler, features)
        return np.argmax(reward - lam * cost, axis=1)
