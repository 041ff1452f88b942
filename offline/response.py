"""Per-action response regressors: expected reward and cost of every action given a feature vector.

Used by the two-stage baseline (features = the current state) and by the offline environment learned
from logs (features = state + a summary of the user's history, so carry-over effects can be learned).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ResponseConfig:
    hidden: int = 64
    layers: int = 2
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0


class ResponseModel(nn.Module):
    """MLP x -> (E[reward | x, a], E[cost | x, a]) for every action a, in raw units."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_scale: torch.Tensor

    def __init__(self, input_dim: int, num_actions: int, cfg: ResponseConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ResponseConfig()
        self.num_actions = num_actions
        dims = [input_dim] + [self.cfg.hidden] * self.cfg.layers
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], 2 * num_actions)
        self.register_buffer("x_mean", torch.zeros(input_dim))
        self.register_buffer("x_std", torch.ones(input_dim))
        self.register_buffer("y_scale", torch.ones(2))
        self.metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2, K] scaled predictions."""
        h = self.body((x - self.x_mean) / self.x_std)
        return self.head(h).view(-1, 2, self.num_actions)

    @torch.inference_mode()
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected reward and cost [N, K] for every action."""
        self.eval()
        out = []
        for i in range(0, len(x), 65536):
            out.append(self(torch.from_numpy(np.ascontiguousarray(x[i : i + 65536], dtype=np.float32))))
        y = torch.cat(out) * self.y_scale.view(1, 2, 1)
        reward = y[:, 0].numpy().astype(np.float64)
        cost = np.clip(y[:, 1].numpy().astype(np.float64), 0.0, None)
        return reward, cost

    def fit(self, x: np.ndarray, action: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> ResponseModel:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        x = np.asarray(x, dtype=np.float32)
        self.x_mean.copy_(torch.from_numpy(x.mean(0)))
        self.x_std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-6)))
        self.y_scale.copy_(torch.tensor([max(float(np.std(reward)), 1e-6), max(float(np.std(cost)), 1e-6)]))
        y = np.stack([reward, cost], axis=1).astype(np.float32) / self.y_scale.numpy()
        perm = rng.permutation(len(x))
        n_val = max(1, int(len(x) * cfg.val_fraction))
        val, tr = perm[:n_val], perm[n_val:]
        xt, at, yt = torch.from_numpy(x), torch.from_numpy(action.astype(np.int64)), torch.from_numpy(y)
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def loss_on(idx: np.ndarray) -> torch.Tensor:
            pred = self(xt[idx])  # [B, 2, K]
            chosen = pred.gather(2, at[idx].view(-1, 1, 1).expand(-1, 2, 1)).squeeze(-1)
            return ((chosen - yt[idx]) ** 2).mean()

        best, best_state, stale = math.inf, copy.deepcopy(self.state_dict()), 0
        for _ in range(cfg.epochs):
            self.train()
            rng.shuffle(tr)
            for i in range(0, len(tr), cfg.batch_size):
                loss = loss_on(tr[i : i + cfg.batch_size])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.eval()
            with torch.no_grad():
                current = float(loss_on(val))
            if current < best - 1e-5:
                best, best_state, stale = current, copy.deepcopy(self.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        self.load_state_dict(best_state)
        self.eval()
        # held-out fit: R^2 of reward and cost for the logged action, and a calibration slope
        pr, pc = self.predict(x[val])
        rows = np.arange(len(val))
        r_hat, c_hat = pr[rows, action[val]], pc[rows, action[val]]
        self.metrics = {
            "heldout_r2_reward": _r2(reward[val], r_hat),
            "heldout_r2_cost": _r2(cost[val], c_hat),
            "calibration_slope_reward": _slope(reward[val], r_hat),
            "calibration_slope_cost": _slope(cost[val], c_hat),
            "heldout_rows": float(len(val)),
        }
        return self


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    denom = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / denom if denom > 0 else float("nan")


def _slope(y: np.ndarray, yhat: np.ndarray) -> float:
    """Slope of y on yhat: 1.0 = calibrated, < 1 over-confident, > 1 under-confident."""
    var = float(np.var(yhat))
    return float(np.cov(yhat, y)[0, 1] / var) if var > 0 else float("nan")
