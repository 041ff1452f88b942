"""The multi-task response network shared by the end-to-end baselines (DFCL, budget regularizer) and
the hidden-representation clustering baseline: a two-layer trunk, then one reward and one cost head per
action. Predictions are E[reward | x, a] and E[cost | x, a] in raw units; uplift is the difference to
action 0. `pretrain` fits it by squared error on the logged action (a T-learner with shared trunk)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offline.logs import Logs
from research.baselines._common import Standardizer, to_tensor


@dataclass
class NetConfig:
    hidden: int = 64
    pretrain_epochs: int = 8
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class ResponseNet(nn.Module):
    y_scale: torch.Tensor  # buffer [2]: standard deviations of reward and cost

    def __init__(self, input_dim: int, num_actions: int, hidden: int, y_scale: tuple[float, float]) -> None:
        super().__init__()
        self.num_actions = num_actions
        self.trunk = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2 * num_actions)
        self.register_buffer("y_scale", torch.tensor(y_scale, dtype=torch.float32))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden representation (output of the first two layers)."""
        return self.trunk(x)

    def scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward and cost [B, K] in units of their logged standard deviations; cost of action 0 is 0."""
        out = self.head(self.trunk(x)).view(-1, 2, self.num_actions)
        cost = out[:, 1].clone()
        cost[:, 0] = 0.0
        return out[:, 0], cost

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward and cost [B, K] in raw units."""
        r, c = self.scaled(x)
        return r * self.y_scale[0], c * self.y_scale[1]


def build(logs: Logs, num_actions: int, cfg: NetConfig) -> tuple[ResponseNet, Standardizer]:
    torch.manual_seed(cfg.seed)
    scaler = Standardizer(logs.features)
    y_scale = (max(float(logs.reward.std()), 1e-6), max(float(logs.cost.std()), 1e-6))
    return ResponseNet(logs.feature_dim, num_actions, cfg.hidden, y_scale), scaler


def mse_on_logged(net: ResponseNet, x: torch.Tensor, a: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared error of the logged action's predictions, in scaled units."""
    pr, pc = net.scaled(x)
    rows = torch.arange(len(a))
    return ((pr[rows, a] - r / net.y_scale[0]) ** 2).mean() + ((pc[rows, a] - c / net.y_scale[1]) ** 2).mean()


def pretrain(
    net: ResponseNet,
    x: torch.Tensor,
    a: torch.Tensor,
    r: torch.Tensor,
    c: torch.Tensor,
    cfg: NetConfig,
    rng: np.random.Generator,
) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    idx = np.arange(len(x))
    net.train()
    for _ in range(cfg.pretrain_epochs):
        rng.shuffle(idx)
        for i in range(0, len(idx), cfg.batch_size):
            b = torch.from_numpy(idx[i : i + cfg.batch_size])
            loss = mse_on_logged(net, x[b], a[b], r[b], c[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()


def tensors(logs: Logs, scaler: Standardizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        to_tensor(scaler(logs.features)),
        torch.from_numpy(logs.action.astype(np.int64)),
        to_tensor(logs.reward),
        to_tensor(logs.cost),
    )


@torch.inference_mode()
def predict(net: ResponseNet, scaler: Standardizer, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reward and cost [N, K] in raw units (cost clipped at 0)."""
    r, c = net(to_tensor(scaler(features)))
    return r.numpy().astype(np.float64), np.clip(c.numpy().astype(np.float64), 0.0, None)
