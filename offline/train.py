"""Training (Algorithm 1): AdamW over trajectory windows, early stopping on held-out users.

`train` fits logs held in memory; `train_windows` streams the window shards of logs of any size
(`saco windows`, offline/windows.py and offline/shards.py), with a step budget and checkpoints to resume from."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import math
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from model_store import atomic_write_bytes
from offline.logs import Logs
from offline.model import ModelConfig, SacoTransformer
from offline.progress import progress as progress_bar
from offline.shards import (
    Read,
    ShardReader,
    WindowStream,
    merge_stats,
    rank_shards,
    shard_stats,
    take,
    validation_batches,
)
from offline.trajectories import Batch, Trajectories, WindowSteps, build_trajectories, make_batch, split_users


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
    max_steps: int | None = None  # a step budget: train exactly this many steps (epochs go on as needed) if set
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
    # training from window shards (train_windows): windows per read of a shard file, and the shuffle buffer's
    # size in windows (a process holds about two buffers of windows, ~0.5 KB each at the default sizes)
    read_windows: int = 2048
    shuffle_buffer: int = 65_536

    def model_config(
        self, feature_dim: int, num_actions: int, action_features: int = 0, table_rows: int = 0
    ) -> ModelConfig:
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
            action_features=action_features,
            table_rows=table_rows,
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
    action_table: np.ndarray | None = None,
) -> TrainResult:
    """Fit the SACO model on `logs`; returns the best model on held-out users.

    `action_table`, if given, [T, F] (contract/catalog.py `Catalog.action_descriptors` or `ActionRows.table`;
    row a describes logged action a): the model names actions by these features rather than by index
    (offline/model.py), so that it scores a catalog it was not trained on. Its action space (no coupon and the
    coupons alone) is `cfg.num_actions`, the table's first rows (None: every row).

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
    distributed, world, rank, device = _join_processes(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if action_table is None:
        num_actions, table_rows = action_space(logs, cfg.num_actions), 0
    else:
        table_rows = action_space(logs, len(action_table))
        num_actions = table_rows if cfg.num_actions is None else cfg.num_actions
        if num_actions > table_rows:
            raise ValueError(f"the action table has {table_rows} rows, fewer than num_actions ({num_actions})")
    traj = build_trajectories(logs, cfg.context_length)
    train_users, val_users = split_users(logs.n_users, cfg.val_fraction, cfg.seed)
    if len(train_users) == 0:
        raise ValueError("too few users to train on")
    in_train = np.isin(logs.user, train_users)
    windows = traj.windows()
    end_user = logs.user[windows[:, -1]]
    train_windows = windows[np.isin(end_user, train_users)]
    val_windows = windows[np.isin(end_user, val_users)]

    features_per_action = 0 if action_table is None else int(action_table.shape[1])
    model = SacoTransformer(cfg.model_config(logs.feature_dim, num_actions, features_per_action, table_rows))
    if action_table is not None:
        model.set_action_table(torch.from_numpy(np.asarray(action_table, np.float32)))
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
    tgt = np.stack(
        [
            logs.reward / rtg_scale,
            logs.cost / ctg_scale,
            (traj.rtg - logs.reward) / rtg_scale,
            (traj.ctg - logs.cost) / ctg_scale,
        ],
        axis=1,
    )[in_train]
    value_weights = _value_weights(tgt.var(0), cfg).to(device)
    steps_per_epoch = max(1, math.ceil(len(train_windows) * draws / (cfg.batch_size * world)))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    fit = _Fit(model, cfg, world, total_steps, device, distributed)
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
    bar = progress_bar("train", total_steps, "step", disable=not progress or rank != 0)
    model.train()
    epoch, done = 0, 0
    for epoch in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        order = np.tile(np.arange(len(train_windows)), draws)
        rng.shuffle(order)
        lam_all = rng.uniform(0, cfg.lambda_max, size=len(order))
        running = 0.0
        steps = min(steps_per_epoch, total_steps - done)
        for step in range(steps):
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
            running += fit.step(batch, value_weights)
            bar.update(1)
        done += steps
        current = val_loss() if len(val_windows) else running / steps
        history.append(current)
        bar.set_postfix(epoch=epoch, train=f"{running / steps:.4f}", val=f"{current:.4f}")
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
        "steps": float(done),
        "train_windows": float(len(train_windows)),
        "val_windows": float(len(val_windows)),
        "world_size": float(world),
    }
    return TrainResult(
        model, cfg, traj, train_users, val_users, initial_rtg, initial_ctg, metrics, time.time() - started
    )


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "saco-train-checkpoint/1"


@dataclass(frozen=True)
class Checkpoints:
    """Where `train_windows` saves its state every `every` steps (and at the end), and whether it resumes from a
    checkpoint it finds there (one of another run is refused, naming what differs)."""

    directory: Path
    every: int = 1000
    resume: bool = True


@dataclass
class StreamResult:
    """A model trained from window shards, with what the export needs in place of the logs."""

    model: SacoTransformer
    config: TrainConfig
    initial_rtg: float
    initial_ctg: float
    metrics: dict[str, float]
    seconds: float
    parity_inputs: tuple[torch.Tensor, ...]  # held-out windows, some with padding, for the export's parity check
    action_costs: list[float]  # mean logged cost of each action
    data_sha256: str  # of the shard files (their sha256 in the windows' manifest)
    processes: list[dict[str, Any]]  # per process: its shards, training windows and peak resident memory


@dataclass
class _Progress:
    """Where a run from window shards stands: what a checkpoint holds besides the model, optimizer and RNGs."""

    step: int = 0
    best: float = math.inf
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    stale: int = 0
    history: list[float] = field(default_factory=list)
    running: float = 0.0  # training loss summed over the epoch's steps so far
    stopped: bool = False  # early stopping (patience) ended the run


def train_windows(
    directory: str | os.PathLike[str],
    cfg: TrainConfig,
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
) -> StreamResult:
    """Fit the SACO model on the window shards `saco windows` wrote to `directory` (offline/shards.py).

    A process reads only its own shards (rank r of a torchrun run of `world` processes: shards r, r + world,
    ...), a few thousand windows at a time, so its memory is bounded by its shuffle buffer, not by the logs.
    The normalisation is merged from every shard's streaming summary, the same in every process. Training runs
    `cfg.max_steps` steps if set, else `cfg.epochs` epochs (an epoch: the steps in which the process with the
    most training windows sees each of them once); the held-out loss is measured at the end of every epoch and
    of the run, and the best model is kept. With `checkpoints`, the run saves its whole state (model,
    optimizer, schedule, every process's RNG, its step, the best model so far) and resumes from it: a run
    killed and started again gives the same model, bit for bit on the same machine and threads, as one not
    killed."""
    from offline.windows import read_manifest  # (DuckDB, which the windows' engine needs, only here)

    started = time.time()
    root = Path(directory)
    manifest = read_manifest(root)
    if cfg.objective != "value":
        raise ValueError(
            f"window shards hold the value objective's windows: train objective {cfg.objective!r} on --logs"
        )
    if int(manifest["context_length"]) != cfg.context_length:
        raise ValueError(
            f"the windows in {root} are {manifest['context_length']} steps long and the model's context is "
            f"{cfg.context_length}: build windows of that length (saco windows --context-length)"
        )
    distributed, world, rank, device = _join_processes(cfg.threads)
    files: list[dict[str, Any]] = manifest["files"]
    if len(files) < world:
        raise ValueError(f"{len(files)} shards for {world} processes: write at least one shard per process")
    readers = {
        s: ShardReader(root / files[s]["file"]) for s in rank_shards(len(files), rank, world) if files[s]["windows"]
    }
    rtg_scale, ctg_scale = float(manifest["rtg_scale"]), float(manifest["ctg_scale"])
    initial_rtg, initial_ctg = float(manifest["initial_rtg"]), float(manifest["initial_ctg"])
    mine = [
        shard_stats(reader, s, cfg.seed, cfg.val_fraction, rtg_scale, ctg_scale, cfg.read_windows)
        for s, reader in readers.items()
    ]
    every_process = _gather(mine, distributed)
    stats = merge_stats([s for part in every_process for s in part])
    windows_per_process = [sum(int(s.train_windows.sum()) for s in part) for part in every_process]
    if min(windows_per_process) == 0:
        raise ValueError(
            f"process {windows_per_process.index(0)} of {world} has no training windows in its shards (process r "
            f"reads shards r, r + {world}, ...): write more shards (saco windows --shards) or use fewer processes"
        )
    reads = [
        Read(s.shard, start, min(start + cfg.read_windows, readers[s.shard].windows), int(n))
        for s in mine
        for start, n in zip(range(0, readers[s.shard].windows, cfg.read_windows), s.train_windows, strict=True)
    ]
    stream = WindowStream(readers, reads, cfg.seed, rank, cfg.val_fraction, cfg.shuffle_buffer, cfg.lambda_max)
    steps_per_epoch = max(1, math.ceil(max(windows_per_process) / cfg.batch_size))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    targets = (initial_rtg, initial_ctg, cfg.max_timestep)  # WindowSteps.batch's last arguments

    torch.manual_seed(cfg.seed)
    feature_names: list[str] = manifest["feature_names"]
    model = SacoTransformer(cfg.model_config(len(feature_names), _action_space(stats.num_actions, cfg.num_actions)))
    model.set_normalisation(torch.from_numpy(stats.state_mean), torch.from_numpy(stats.state_std), rtg_scale, ctg_scale)
    value_weights = _value_weights(stats.target_var, cfg).to(device)
    fit = _Fit(model, cfg, world, total_steps, device, distributed)

    def held_out_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for steps, lam in validation_batches(readers, cfg.seed, cfg.val_fraction, cfg.lambda_max, cfg.read_windows):
                batch = _to(steps.batch(lam, *targets), device)
                total += float(_loss(model, batch, value_weights)) * len(lam)
                count += len(lam)
        model.train()
        return _mean_over_processes(total, count, distributed, device)

    data_sha256 = hashlib.sha256("\n".join(str(f["sha256"]) for f in files).encode()).hexdigest()
    run = {"config": _run_config(cfg), "windows_sha256": data_sha256, "world_size": world}
    state = _Progress(best_state=copy.deepcopy(model.state_dict()))
    if checkpoints is not None and checkpoints.resume:
        state = _resume(checkpoints, run, fit, rank) or state
    resumed_from = state.step
    bar = progress_bar("train", total_steps, "step", disable=not progress or rank != 0)
    bar.update(state.step)
    model.train()
    while state.step < total_steps and not state.stopped:
        epoch, step = divmod(state.step, steps_per_epoch)
        windows, lam = stream.batch(epoch, step, cfg.batch_size)
        state.running += fit.step(_to(windows.batch(lam, *targets), device), value_weights)
        state.step += 1
        bar.update(1)
        if state.step % steps_per_epoch == 0 or state.step == total_steps:
            steps = state.step - epoch * steps_per_epoch
            train_loss = _mean_over_processes(state.running, steps, distributed, device)
            current = held_out_loss() if stats.val_windows else train_loss
            state.history.append(current)
            bar.set_postfix(epoch=epoch + 1, train=f"{train_loss:.4f}", val=f"{current:.4f}")
            state.running = 0.0
            if current < state.best - 1e-5:
                state.best, state.best_state, state.stale = current, copy.deepcopy(model.state_dict()), 0
            else:
                state.stale += 1
                state.stopped = state.stale >= cfg.patience
        if checkpoints is not None and (
            state.step % checkpoints.every == 0 or state.step == total_steps or state.stopped
        ):
            _save(checkpoints, run, fit, state, distributed, rank)
    bar.close()
    model.load_state_dict(state.best_state)
    model.to("cpu")
    model.eval()
    metrics = {
        "val_loss": state.best,
        "epochs_run": state.step / steps_per_epoch,
        "steps": float(state.step),
        "resumed_from_step": float(resumed_from),
        "train_windows": float(stats.train_windows),
        "val_windows": float(stats.val_windows),
        "world_size": float(world),
    }
    processes = _gather(
        {
            "rank": rank,
            "shards": list(readers),
            "train_windows": stream.windows,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        distributed,
    )
    return StreamResult(
        model,
        cfg,
        initial_rtg,
        initial_ctg,
        metrics,
        time.time() - started,
        _parity_inputs(readers, stream, cfg, targets) if rank == 0 else (),
        (stats.action_costs + [0.0] * model.cfg.num_actions)[: model.cfg.num_actions],
        data_sha256,
        processes,
    )


T = TypeVar("T")


def _gather(value: T, distributed: bool) -> list[T]:
    """Every process's `value`, in rank order."""
    if not distributed:
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _mean_over_processes(total: float, count: float, distributed: bool, device: torch.device) -> float:
    """sum(total) / sum(count) over the processes: the same number in every one of them."""
    if distributed:
        summed = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        total, count = float(summed[0]), float(summed[1])
    return total / max(count, 1)


def _run_config(cfg: TrainConfig) -> dict[str, object]:
    """What a checkpoint must have been trained with to resume a run (threads change no result)."""
    return {k: v for k, v in config_dict(cfg).items() if k != "threads"}


def _save(
    checkpoints: Checkpoints, run: dict[str, object], fit: _Fit, state: _Progress, distributed: bool, rank: int
) -> None:
    rng = _gather(torch.get_rng_state(), distributed)  # dropout draws: each process's own generator
    if rank != 0:
        return
    payload = {
        "format": CHECKPOINT_FORMAT,
        "run": run,
        "model": fit.model.state_dict(),
        "optimizer": fit.optimizer.state_dict(),
        "scheduler": fit.scheduler.state_dict(),
        "rng": rng,
        "progress": asdict(state),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    checkpoints.directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(checkpoints.directory / CHECKPOINT, buffer.getvalue())


def _resume(checkpoints: Checkpoints, run: dict[str, object], fit: _Fit, rank: int) -> _Progress | None:
    """The progress of the checkpoint in `checkpoints.directory` (None if there is none), its model, optimizer,
    schedule and this process's RNG restored; ValueError if it is of another run."""
    path = checkpoints.directory / CHECKPOINT
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of format {CHECKPOINT_FORMAT}")
    if saved["run"] != run:
        mine, theirs = _flat(run), _flat(saved["run"])
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"{path} is a checkpoint of another run (it differs in {', '.join(differ)}): "
            "start afresh with --no-resume or use another --checkpoint-dir"
        )
    fit.model.load_state_dict(saved["model"])
    fit.optimizer.load_state_dict(saved["optimizer"])
    fit.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"][rank])
    return _Progress(**saved["progress"])


def _flat(run: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run's description as one level of keys ("config.seed")."""
    out: dict[str, Any] = {}
    for key, value in run.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _parity_inputs(
    readers: dict[int, ShardReader],
    stream: WindowStream,
    cfg: TrainConfig,
    targets: tuple[float, float, int],
    n: int = 256,
) -> tuple[torch.Tensor, ...]:
    """Up to `n` held-out windows (training windows if there are none) at lambdas in [0, 2), some with their
    first steps masked out (padding), for the export to compare the scripted policy with the model on."""
    found = next(validation_batches(readers, cfg.seed, cfg.val_fraction, cfg.lambda_max, cfg.read_windows), None)
    windows = found[0] if found is not None else stream.batch(0, 0, cfg.batch_size)[0]
    rng = np.random.default_rng(cfg.seed)
    windows = take(windows, rng.permutation(len(windows.loss_mask))[:n])
    hidden = (
        np.arange(cfg.context_length)[None, :] < rng.integers(0, cfg.context_length, len(windows.loss_mask))[:, None]
    )
    history = dataclasses.replace(windows.history, mask=windows.history.mask & ~hidden)
    lam = rng.uniform(0.0, 2.0, size=len(windows.loss_mask))
    return WindowSteps(history, windows.loss_mask, windows.value_targets).batch(lam, *targets).inputs


def _value_weights(target_var: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """Each value head's loss is divided by its target variance, so now/later, revenue/cost weigh alike; the
    "later" heads take no loss unless `later_loss_weight` > 0."""
    value_weights = torch.from_numpy(np.maximum(target_var, 1e-6).astype(np.float32))
    if cfg.later_loss_weight <= 0:
        value_weights[2:] = float("inf")  # later heads take no loss
    else:
        value_weights[2:] /= cfg.later_loss_weight
    return value_weights


class _Fit:
    """The model on its device, its optimizer and schedule, and one optimisation step."""

    def __init__(
        self,
        model: SacoTransformer,
        cfg: TrainConfig,
        world: int,
        total_steps: int,
        device: torch.device,
        distributed: bool,
    ) -> None:
        model.to(device)
        self.model = model
        self.forward: torch.nn.Module = model
        if distributed:
            # the objective leaves some heads out of the loss (the policy logits of the value objective)
            self.forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
            )
        # a global batch world_size times larger takes world_size times fewer steps: the learning rate scales
        # with it (the linear scaling rule), so the same epochs reach the same loss
        lr = cfg.lr * world
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        self.scheduler = one_cycle(self.optimizer, lr, total_steps)

    def step(self, batch: Batch, value_weights: torch.Tensor) -> float:
        """One step on `batch`; its loss."""
        loss = _loss(self.model, batch, value_weights, self.forward)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())


def action_space(logs: Logs, num_actions: int | None) -> int:
    """The model's number of actions: `num_actions` when given (ValueError when the logs hold an action beyond
    it), else the logged actions' (at least 2)."""
    return _action_space(logs.num_actions, num_actions)


def _action_space(logged: int, num_actions: int | None) -> int:
    if num_actions is None:
        return max(logged, 2)
    if num_actions < 2:
        raise ValueError(f"the action space needs no coupon and at least one coupon, got {num_actions} actions")
    if logged > num_actions:
        raise ValueError(f"the logs hold action {logged - 1}, beyond the {num_actions} actions asked for")
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


def _join_processes(threads: int) -> tuple[bool, int, int, torch.device]:
    """This process's place among torchrun's (distributed or not, world size, rank) and its device; sets
    torch's intra-op threads when `threads` is given."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    rank = torch.distributed.get_rank() if distributed else 0
    if threads:
        torch.set_num_threads(threads)
    return distributed, world, rank, _device(distributed)


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
