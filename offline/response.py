"""Per-action response regressors given a feature vector.

- `ResponseModel`: expected reward and cost of every action (the two-stage baseline; features = the
  current state).
- `OutcomeModel`: the same expectations split into the probability of an outcome event (any nonzero
  reward or cost: a purchase) and the reward and cost given one, so single outcomes can be sampled as
  well as averaged (the offline environment learned from logs; features = state + a summary of the
  user's history, so carry-over effects can be learned).

Every weight is drawn from `ResponseConfig.seed` (layers are built under a forked, seeded torch RNG), so
a fit on the same data gives the same model bit for bit, without touching torch's global RNG.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
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


def _mlp(input_dim: int, outputs: int, cfg: ResponseConfig) -> tuple[nn.Sequential, nn.Linear]:
    """Body and head, initialised from `cfg.seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        dims = [input_dim] + [cfg.hidden] * cfg.layers
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers), nn.Linear(dims[-1], outputs)


def _fit(
    model: nn.Module,
    n_rows: int,
    loss_on: Callable[[np.ndarray], torch.Tensor],
    cfg: ResponseConfig,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """AdamW on row minibatches with early stopping on a held-out fraction; keeps the best state.
    Returns the held-out rows; `log` is told of every epoch."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n_rows)
    n_val = max(1, int(n_rows * cfg.val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
    for epoch in range(cfg.epochs):
        model.train()
        rng.shuffle(tr)
        for i in range(0, len(tr), cfg.batch_size):
            loss = loss_on(tr[i : i + cfg.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            current = float(loss_on(val))
        if log is not None:
            log(f"  epoch {epoch + 1}/{cfg.epochs}: held-out loss {current:.4f}")
        if current < best - 1e-5:
            best, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return val


def _fit_metrics(reward: np.ndarray, cost: np.ndarray, r_hat: np.ndarray, c_hat: np.ndarray) -> dict[str, float]:
    """Held-out fit of the expected reward and cost of the logged action: R^2 and calibration slope."""
    return {
        "heldout_r2_reward": _r2(reward, r_hat),
        "heldout_r2_cost": _r2(cost, c_hat),
        "calibration_slope_reward": _slope(reward, r_hat),
        "calibration_slope_cost": _slope(cost, c_hat),
        "heldout_rows": float(len(reward)),
    }


def _batched(module: nn.Module, x: np.ndarray) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 65536):
        out.append(module(torch.from_numpy(np.ascontiguousarray(x[i : i + 65536], dtype=np.float32))))
    return torch.cat(out)


class ResponseModel(nn.Module):
    """MLP x -> (E[reward | x, a], E[cost | x, a]) for every action a, in raw units."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_scale: torch.Tensor

    def __init__(self, input_dim: int, num_actions: int, cfg: ResponseConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ResponseConfig()
        self.num_actions = num_actions
        self.body, self.head = _mlp(input_dim, 2 * num_actions, self.cfg)
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
        y = _batched(self, x) * self.y_scale.view(1, 2, 1)
        reward = y[:, 0].numpy().astype(np.float64)
        cost = np.clip(y[:, 1].numpy().astype(np.float64), 0.0, None)
        return reward, cost

    def fit(self, x: np.ndarray, action: np.ndarray, reward: np.ndarray, cost: np.ndarray) -> ResponseModel:
        x = np.asarray(x, dtype=np.float32)
        self.x_mean.copy_(torch.from_numpy(x.mean(0)))
        self.x_std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-6)))
        self.y_scale.copy_(torch.tensor([max(float(np.std(reward)), 1e-6), max(float(np.std(cost)), 1e-6)]))
        y = np.stack([reward, cost], axis=1).astype(np.float32) / self.y_scale.numpy()
        xt, at, yt = torch.from_numpy(x), torch.from_numpy(action.astype(np.int64)), torch.from_numpy(y)

        def loss_on(idx: np.ndarray) -> torch.Tensor:
            pred = self(xt[idx])  # [B, 2, K]
            chosen = pred.gather(2, at[idx].view(-1, 1, 1).expand(-1, 2, 1)).squeeze(-1)
            return ((chosen - yt[idx]) ** 2).mean()

        val = _fit(self, len(x), loss_on, self.cfg)
        pr, pc = self.predict(x[val])
        rows = np.arange(len(val))
        self.metrics = _fit_metrics(reward[val], cost[val], pr[rows, action[val]], pc[rows, action[val]])
        return self


class OutcomeModel(nn.Module):
    """A hurdle model per action: P(event | x, a), and the reward and cost given an event, where an event
    is any outcome with a nonzero reward or cost (in coupon logs: a purchase). Expected values are their
    products, so a sampled outcome (Bernoulli event, then the conditional values) has exactly the
    expectation the model predicts."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_scale: torch.Tensor

    def __init__(self, input_dim: int, num_actions: int, cfg: ResponseConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ResponseConfig()
        self.num_actions = num_actions
        self.body, self.head = _mlp(input_dim, 3 * num_actions, self.cfg)
        self.register_buffer("x_mean", torch.zeros(input_dim))
        self.register_buffer("x_std", torch.ones(input_dim))
        self.register_buffer("y_scale", torch.ones(2))
        self.metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, K]: event logit, scaled reward and scaled cost given an event."""
        h = self.body((x - self.x_mean) / self.x_std)
        return self.head(h).view(-1, 3, self.num_actions)

    @torch.inference_mode()
    def predict_parts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P(event), reward given an event (>= 0) and cost given an event (>= 0), each [N, K]."""
        self.eval()
        y = _batched(self, x)
        p = torch.sigmoid(y[:, 0]).numpy().astype(np.float64)
        reward = np.clip((y[:, 1] * self.y_scale[0]).numpy().astype(np.float64), 0.0, None)
        cost = np.clip((y[:, 2] * self.y_scale[1]).numpy().astype(np.float64), 0.0, None)
        return p, reward, cost

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected reward and cost [N, K] for every action."""
        p, reward, cost = self.predict_parts(x)
        return p * reward, p * cost

    def fit(
        self,
        x: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        cost: np.ndarray,
        log: Callable[[str], None] | None = None,
    ) -> OutcomeModel:
        x = np.asarray(x, dtype=np.float32)
        event = (reward != 0) | (cost != 0)
        self.x_mean.copy_(torch.from_numpy(x.mean(0)))
        self.x_std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-6)))
        seen = event if event.any() else np.ones_like(event)
        scale = [max(float(np.sqrt(np.mean(v[seen] ** 2))), 1e-6) for v in (reward, cost)]
        self.y_scale.copy_(torch.tensor(scale))
        y = np.stack([reward, cost], axis=1).astype(np.float32) / self.y_scale.numpy()
        xt, at = torch.from_numpy(x), torch.from_numpy(action.astype(np.int64))
        yt, et = torch.from_numpy(y), torch.from_numpy(event.astype(np.float32))

        def loss_on(idx: np.ndarray) -> torch.Tensor:
            pred = self(xt[idx])  # [B, 3, K]
            chosen = pred.gather(2, at[idx].view(-1, 1, 1).expand(-1, 3, 1)).squeeze(-1)
            e = et[idx]
            bce = nn.functional.binary_cross_entropy_with_logits(chosen[:, 0], e)
            # the conditional values are learned from event rows only
            sq = ((chosen[:, 1:] - yt[idx]) ** 2).sum(1)
            return bce + (sq * e).sum() / e.sum().clamp(min=1.0)

        val = _fit(self, len(x), loss_on, self.cfg, log)
        pr, pc = self.predict(x[val])
        rows = np.arange(len(val))
        self.metrics = _fit_metrics(reward[val], cost[val], pr[rows, action[val]], pc[rows, action[val]])
        p_hat = self.predict_parts(x[val])[0][rows, action[val]]
        self.metrics["heldout_event_rate"] = float(event[val].mean())
        self.metrics["heldout_predicted_event_rate"] = float(p_hat.mean())
        return self


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    denom = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / denom if denom > 0 else float("nan")


def _slope(y: np.ndarray, yhat: np.ndarray) -> float:
    """Slope of y on yhat: 1.0 = calibrated, < 1 over-confident, > 1 under-confident."""
    var = float(np.var(yhat))
    return float(np.cov(yhat, y)[0, 1] / var) if var > 0 else float("nan")
