"""Training (Algorithm 1): AdamW over trajectory windows, early stopping on held-out users."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from offline.logs import Logs
from offline.model import ModelConfig, SacoTransformer
from offline.progress import progress as progress_bar
from offline.trajectories import Batch, Trajectories, build_trajectories, make_batch, split_users


@dataclass
class TrainConfig:
    objective: str = "value"
    token_layout: str = "step"
    # 6 steps and width 32: the same revenue at equal spend as 10 and 64 (benchmarks/model_variants.py, two
    # seeds; docs/offline.md) for ~35% less of the serving forward at 128 users
    context_length: int = 6
    d_model: int = 32
    n_layers: int = 1  # serving budget: a 2nd layer gains <=0.8% revenue for ~3x the forward (docs/service.md)
    n_heads: int = 4
    dropout: float = 0.1
    epochs: int = 12  # one-cycle schedule: the weights end annealed (measured better than 20 or 40)
    patience: int = 12  # epochs without validation improvement before stopping (>= epochs: never)
    batch_size: int = 128  # windows per step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lambda_draws: int = 10  # lambda augmentation per trajectory (dt objectives; value ignores lambda)
    lambda_max: float = 1.0
    val_fraction: float = 0.2
    max_timestep: int = 64
    future_weight: float = 0.0  # weight of the "later" value heads in the decision (see docs/offline.md)
    history_decays: tuple[float, ...] = (0.5, 0.8)
    later_loss_weight: float = 0.0  # loss weight of the "later" value heads (an auxiliary task; 0 = off)
    seed: int = 0
    threads: int = 0  # 0 = torch default
    # the action space (no coupon + the coupons); None: the logged actions'. A model that replaces a serving one
    # must have its action count (replicas refuse another), whatever the logs happen to hold
    num_actions: int | None = None

    def model_config(self, feature_dim: int, num_actions: int) -> ModelConfig:
        return ModelConfig(
            feature_dim=feature_dim,
            num_actions=num_actions,
            context_length=self.context_length,
            max_timestep=self.max_timestep,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            token_layout=self.token_layout,
            objective=self.objective,
            future_weight=self.future_weight,
            history_decays=tuple(self.history_decays),
        )


@dataclass
class TrainResult:
    model: SacoTransformer
    config: TrainConfig
    trajectories: Trajectories
    train_users: np.ndarray
    val_users: np.ndarray
    initial_rtg: float
    initial_ctg: float
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _loss(
    model: SacoTransformer, batch, value_weights: torch.Tensor, forward: torch.nn.Module | None = None
) -> torch.Tensor:
    """`forward` (default: `model`) runs the batch: the DistributedDataParallel wrapper under torchrun."""
    run = forward if forward is not None else model
    logits, values = run(*batch.inputs)
    mask = batch.loss_mask
    if model.value_objective:
        scale = torch.stack([model.rtg_scale, model.ctg_scale, model.rtg_scale, model.ctg_scale])
        idx = batch.taken.unsqueeze(-1).unsqueeze(-1).expand(*batch.taken.shape, 4, 1)
        pred = values.gather(3, idx).squeeze(-1)  # [B, L, 4] prediction for the logged action
        err = (pred - batch.value_targets / scale) ** 2 / value_weights
        return err.sum(-1)[mask].mean()
    return F.cross_entropy(logits[mask], batch.taken[mask])


def train(
    logs: Logs,
    cfg: TrainConfig,
    progress: bool = True,
    batch_transform: Callable[[Batch], Batch] | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Fit the SACO model on `logs`; returns the best model on held-out users.

    `initial`, if given, is a state dict of a model of the same configuration to start from (a warm start:
    its weights and its input normalisation, so the weights keep their meaning) instead of a fresh one.

    `batch_transform`, if given, is applied to every training and validation batch before the model sees
    it (e.g. to zero an input for an ablation); the product trains without one.

    Data-parallel when a torch.distributed process group is initialised (`saco train` under torchrun):
    every process holds the same logs and the same shuffled order, takes every world_size-th batch of
    it, and DistributedDataParallel averages the gradients, so each step is one global batch of
    world_size x batch_size windows and an epoch takes 1/world_size of the steps. Every process ends with
    the same weights."""
    started = time.time()
    transform = batch_transform or (lambda batch: batch)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    rank = torch.distributed.get_rank() if distributed else 0
    device = _device(distributed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    num_actions = action_space(logs, cfg.num_actions)
    traj = build_trajectories(logs, cfg.context_length)
    train_users, val_users = split_users(logs.n_users, cfg.val_fraction, cfg.seed)
    if len(train_users) == 0:
        raise ValueError("too few users to train on")
    in_train = np.isin(logs.user, train_users)
    windows = traj.windows()
    end_user = logs.user[windows[:, -1]]
    train_windows = windows[np.isin(end_user, train_users)]
    val_windows = windows[np.isin(end_user, val_users)]

    model = SacoTransformer(cfg.model_config(logs.feature_dim, num_actions))
    feats = logs.features[in_train]
    rtg_scale, ctg_scale = traj.scales()
    model.set_normalisation(torch.from_numpy(feats.mean(0)), torch.from_numpy(feats.std(0)), rtg_scale, ctg_scale)
    if initial is not None:
        model.load_state_dict(initial)
    if cfg.objective == "value":
        initial_rtg, initial_ctg = traj.initial_targets()
        draws = 1
    else:
        first = traj.position == 0
        initial_rtg = float(np.quantile(traj.rtg[first], 0.75))
        initial_ctg = float(np.mean(traj.ctg[first]))
        draws = cfg.lambda_draws
    targets = (initial_rtg, initial_ctg, cfg.max_timestep)  # make_batch's last arguments
    # each value head's loss is divided by its target variance so now/later, revenue/cost weigh alike
    tgt = np.stack(
        [
            logs.reward / rtg_scale,
            logs.cost / ctg_scale,
            (traj.rtg - logs.reward) / rtg_scale,
            (traj.ctg - logs.cost) / ctg_scale,
        ],
        axis=1,
    )[in_train]
    value_weights = torch.from_numpy(np.maximum(tgt.var(0), 1e-6).astype(np.float32))
    if cfg.later_loss_weight <= 0:
        value_weights[2:] = float("inf")  # later heads take no loss
    else:
        value_weights[2:] /= cfg.later_loss_weight

    model.to(device)
    value_weights = value_weights.to(device)
    forward: torch.nn.Module = model
    if distributed:
        # the objective leaves some heads out of the loss (the policy logits of the value objective)
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    # a global batch world_size times larger takes world_size times fewer steps: the learning rate scales with
    # it (the linear scaling rule), so the same epochs reach the same loss
    lr = cfg.lr * world
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_windows) * draws / (cfg.batch_size * world)))
    scheduler = one_cycle(optimizer, lr, cfg.epochs * steps_per_epoch)
    val_lam = rng.uniform(0, cfg.lambda_max, size=len(val_windows))

    def val_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(val_windows), 2048):
                w = val_windows[i : i + 2048]
                b = _to(
                    transform(make_batch(traj, w, cfg.objective, val_lam[i : i + 2048], *targets)),
                    device,
                )
                total += float(_loss(model, b, value_weights)) * len(w)
                count += len(w)
        model.train()
        return total / max(count, 1)

    best, best_state, stale, history = math.inf, copy.deepcopy(model.state_dict()), 0, []
    bar = progress_bar("train", cfg.epochs * steps_per_epoch, "step", disable=not progress or rank != 0)
    model.train()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        order = np.tile(np.arange(len(train_windows)), draws)
        rng.shuffle(order)
        lam_all = rng.uniform(0, cfg.lambda_max, size=len(order))
        running = 0.0
        for step in range(steps_per_epoch):
            # this process's share of the global batch: every process runs every step (DDP needs it),
            # a process whose share is empty at the end of an epoch repeats the epoch's first windows
            lo = (step * world + rank) * cfg.batch_size
            pick = np.arange(lo, lo + cfg.batch_size)
            pick = pick[pick < len(order)] if world == 1 else pick % len(order)
            sel = order[pick]
            if len(sel) == 0:
                continue
            batch = _to(
                transform(make_batch(traj, train_windows[sel], cfg.objective, lam_all[pick], *targets)),
                device,
            )
            loss = _loss(model, batch, value_weights, forward)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            bar.update(1)
        current = val_loss() if len(val_windows) else running / steps_per_epoch
        history.append(current)
        bar.set_postfix(epoch=epoch, train=f"{running / steps_per_epoch:.4f}", val=f"{current:.4f}")
        if current < best - 1e-5:
            best, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.to("cpu")
    model.eval()
    metrics = {
        "val_loss": best,
        "epochs_run": float(epoch),
        "train_windows": float(len(train_windows)),
        "val_windows": float(len(val_windows)),
        "world_size": float(world),
    }
    return TrainResult(
        model, cfg, traj, train_users, val_users, initial_rtg, initial_ctg, metrics, time.time() - started
    )


def action_space(logs: Logs, num_actions: int | None) -> int:
    """The model's number of actions: `num_actions` when given (ValueError when the logs hold an action beyond
    it), else the logged actions' (at least 2)."""
    if num_actions is None:
        return max(logs.num_actions, 2)
    if num_actions < 2:
        raise ValueError(f"the action space needs no coupon and at least one coupon, got {num_actions} actions")
    if logs.num_actions > num_actions:
        raise ValueError(f"the logs hold action {logs.num_actions - 1}, beyond the {num_actions} actions asked for")
    return num_actions


WARMUP = 0.1  # share of the steps of the one-cycle schedule's warm-up


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate over `total_steps` steps: a warm-up to `lr` over the first 10%, then a cosine anneal.

    OneCycleLR ends its warm-up at step ``pct_start * total_steps - 1`` and divides by the warm-up's length: a
    warm-up of exactly one step (10 steps at 10%) divides by zero. Below two steps of warm-up there is none (the
    anneal starts at `lr`); a single step runs at `lr`."""
    if total_steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    pct_start = WARMUP if WARMUP * total_steps >= 2 else 0.0
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start)


def _device(distributed: bool) -> torch.device:
    """CPU, or under torchrun with the nccl backend this process's GPU (LOCAL_RANK)."""
    if distributed and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch

    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True)

    return Batch(tuple(map(to, batch.inputs)), to(batch.taken), to(batch.loss_mask), to(batch.value_targets))


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl when this machine has GPUs, else
    gloo. Returns whether training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return True


def config_dict(cfg: TrainConfig) -> dict[str, object]:
    return asdict(cfg)
