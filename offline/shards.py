"""Training windows streamed from the shard files `saco windows` writes (offline/windows.py), a slice at a time.

A shard file is an uncompressed `.npz` (a zip of `.npy` members, one row per window): `ShardReader` reads any
range of windows of it with positional reads, so a process holds the windows it is training on, never a whole
shard, let alone the log.

What a process of a data-parallel run of `world` processes reads (`rank_shards`): shards rank, rank + world,
rank + 2 world, ... Within them:

- **Held-out users** (`held_out`): a user is a validation user when a hash of (seed, shard, the user's index in
  the shard) falls below `val_fraction`; every window of a user is on one side.
- **Statistics** (`shard_stats`, `merge_stats`): one streaming pass over the shard's windows gives, per shard,
  the count, mean and sum of squared deviations of the training users' features and value targets (each logged
  step is in exactly one window's loss mask, so those steps are the training rows), the largest action and each
  action's cost. Per-shard summaries are merged in shard order (Chan et al.), so every process, whatever the
  number of processes, derives the same normalisation, bit for bit.
- **The order** (`WindowStream`): each epoch a process's shards are cut into reads of `read_windows` windows,
  the reads are put in a random order (seeded by seed, epoch and rank), and consecutive reads fill a shuffle
  buffer of `buffer_windows` windows, which is shuffled and drawn from in batches. A batch is a pure function of
  (seed, rank, epoch, step), so training resumes at any step by reading the one buffer that step is in.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contract.inputs import History
from offline.trajectories import WindowSteps

# the members of a window of a shard file, in the order WindowSteps holds them
HISTORY_MEMBERS = ("states", "actions", "reward", "cost", "timesteps", "mask", "reward_before_last", "cost_before_last")
STEP_MEMBERS = ("window_user", *HISTORY_MEMBERS, "loss_mask", "value_targets")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local file header (its last two: name, extra)


class ShardReader:
    """Ranges of windows of one shard file, read on demand (positional reads of its `.npy` members)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._members: dict[str, tuple[int, np.dtype[Any], tuple[int, ...]]] = {}
        self._loaded: dict[str, np.ndarray] = {}  # members stored compressed: read whole, once
        try:
            self._index()
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable shard file ({exc})") from exc
        missing = [name for name in STEP_MEMBERS if name not in self._members and name not in self._loaded]
        if missing:
            raise ValueError(f"{self.path}: not a window shard (no {', '.join(missing)})")
        self.windows = self.shape("window_user")[0]

    def _index(self) -> None:
        """Where each member's array starts in the file, its dtype and shape."""
        with zipfile.ZipFile(self.path) as archive, open(self.path, "rb") as fh:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    with archive.open(info) as member:
                        self._loaded[name] = np.lib.format.read_array(member, allow_pickle=False)
                    continue
                fh.seek(info.header_offset)
                header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
                fh.seek(info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1])
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                if fortran or dtype.hasobject:
                    raise ValueError(f"{self.path}: member {info.filename} is not a plain C-ordered array")
                self._members[name] = (fh.tell(), dtype, tuple(shape))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._loaded:
            return tuple(self._loaded[name].shape)
        return self._members[name][2]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start:stop of a member (all of it by default)."""
        if name in self._loaded:
            return self._loaded[name][start:stop].copy()
        offset, dtype, shape = self._members[name]
        stop = shape[0] if stop is None else min(stop, shape[0])
        start = min(start, stop)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((stop - start, *shape[1:]), dtype)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(offset + start * row)
            view = out.reshape(-1).view(np.uint8).data
            done = 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise ValueError(f"{self.path}: member {name} ends early (a truncated shard file)")
                done += got
        return out

    def steps(self, start: int, stop: int) -> tuple[np.ndarray, WindowSteps]:
        """Windows start:stop: each one's user (index into the shard's users) and its steps."""
        arrays = {name: self.read(name, start, stop) for name in STEP_MEMBERS}
        history = History(*(arrays[name] for name in HISTORY_MEMBERS))
        return arrays["window_user"], WindowSteps(history, arrays["loss_mask"], arrays["value_targets"])


def take(steps: WindowSteps, rows: np.ndarray | slice) -> WindowSteps:
    """Some windows of `steps`."""
    h = steps.history
    history = History(*(getattr(h, name)[rows] for name in HISTORY_MEMBERS))
    return WindowSteps(history, steps.loss_mask[rows], steps.value_targets[rows])


def concat(parts: Sequence[WindowSteps]) -> WindowSteps:
    """The windows of `parts`, one after the other."""
    if len(parts) == 1:
        return parts[0]
    history = History(*(np.concatenate([getattr(p.history, name) for p in parts]) for name in HISTORY_MEMBERS))
    return WindowSteps(
        history,
        np.concatenate([p.loss_mask for p in parts]),
        np.concatenate([p.value_targets for p in parts]),
    )


def rank_shards(shards: int, rank: int, world: int) -> list[int]:
    """The shards process `rank` of `world` reads: rank, rank + world, ..."""
    return list(range(rank, shards, world))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each (uint64) value."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def held_out(seed: int, shard: int, users: np.ndarray, val_fraction: float) -> np.ndarray:
    """Whether each user (index into the shard's users) is a validation user of a run with this seed: a hash of
    (seed, shard, user) uniform in [0, 1) below `val_fraction`."""
    key = _mix(np.array([seed & (2**64 - 1), shard], dtype=np.uint64) * _GOLDEN)
    h = _mix((users.astype(np.uint64) + np.uint64(1)) * _GOLDEN ^ key[0] ^ _mix(key[1:] + _GOLDEN)[0])
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of a stream of vectors, merged batch by batch (Chan et al.)."""

    n: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, values: np.ndarray) -> None:
        """Rows of `values` [n, d]."""
        if len(values):
            values = values.astype(np.float64)
            mean = values.mean(0)
            self.merge(Moments(len(values), mean, np.square(values - mean).sum(0)))

    def merge(self, other: Moments) -> None:
        if not other.n:
            return
        if not self.n:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / total)
        self.n = total

    def var(self) -> np.ndarray:
        return self.m2 / self.n if self.n else self.m2


@dataclass
class ShardStats:
    """One shard's contribution to the normalisation and the action space, and its training windows per read."""

    shard: int
    features: Moments  # the training users' logged steps
    targets: Moments  # their value targets, in scaled units (revenue and cost now and later)
    action_cost: np.ndarray  # [K] every user's total cost per action
    action_count: np.ndarray  # [K] every user's steps per action
    train_windows: np.ndarray  # [reads] windows of training users in each read of `read_windows`
    val_windows: int


def shard_stats(
    reader: ShardReader,
    shard: int,
    seed: int,
    val_fraction: float,
    rtg_scale: float,
    ctg_scale: float,
    read_windows: int,
) -> ShardStats:
    """One streaming pass over a shard (ShardStats)."""
    scale = np.array([rtg_scale, ctg_scale, rtg_scale, ctg_scale])
    features, targets = Moments(), Moments()
    cost, count = np.zeros(0), np.zeros(0, np.int64)
    train_windows, val_windows = [], 0
    for start in range(0, reader.windows, read_windows):
        stop = min(start + read_windows, reader.windows)
        users = reader.read("window_user", start, stop)
        loss_mask = reader.read("loss_mask", start, stop)
        actions = reader.read("actions", start, stop)[loss_mask]
        value_targets = reader.read("value_targets", start, stop)
        train = ~held_out(seed, shard, users, val_fraction)
        train_windows.append(int(train.sum()))
        val_windows += int((~train).sum())
        rows = loss_mask & train[:, None]
        features.add(reader.read("states", start, stop)[rows])
        targets.add(value_targets[rows] / scale)
        k = int(actions.max()) + 1 if len(actions) else 0
        cost = np.pad(cost, (0, max(0, k - len(cost))))
        count = np.pad(count, (0, max(0, k - len(count))))
        cost[:k] += np.bincount(actions, weights=value_targets[..., 1][loss_mask], minlength=k)
        count[:k] += np.bincount(actions, minlength=k)
    return ShardStats(shard, features, targets, cost, count, np.array(train_windows, np.int64), val_windows)


@dataclass(frozen=True)
class DataStats:
    """What training needs to know of all the shards before its first step."""

    state_mean: np.ndarray  # [d] f32
    state_std: np.ndarray  # [d] f32
    target_var: np.ndarray  # [4] f64 variance of the scaled value targets
    num_actions: int  # the logged actions' (largest + 1)
    action_costs: list[float]  # mean cost of each logged action's steps
    rows: int  # training rows
    train_windows: int
    val_windows: int


def merge_stats(stats: Sequence[ShardStats]) -> DataStats:
    """Every shard's summary merged in shard order: the same bits from any split of the shards over processes."""
    features, targets = Moments(), Moments()
    k = max((len(s.action_count) for s in stats), default=0)
    cost, count = np.zeros(k), np.zeros(k, np.int64)
    for s in sorted(stats, key=lambda s: s.shard):
        features.merge(s.features)
        targets.merge(s.targets)
        cost[: len(s.action_cost)] += s.action_cost
        count[: len(s.action_count)] += s.action_count
    if not features.n:
        raise ValueError("the window shards hold no training windows: too few users (or val_fraction too high)")
    return DataStats(
        state_mean=features.mean.astype(np.float32),
        state_std=np.sqrt(features.var()).astype(np.float32),
        target_var=targets.var(),
        num_actions=k,
        action_costs=[float(c / n) if n else 0.0 for c, n in zip(cost, count, strict=True)],
        rows=features.n,
        train_windows=int(sum(int(s.train_windows.sum()) for s in stats)),
        val_windows=sum(s.val_windows for s in stats),
    )


@dataclass(frozen=True)
class Read:
    """`read_windows` consecutive windows of a shard, of which `train` are of training users."""

    shard: int
    start: int
    stop: int
    train: int


class WindowStream:
    """One process's training windows, epoch by epoch, in batches drawn from a shuffle buffer (module docstring).

    `reads` are the process's reads with their training-window counts (from `shard_stats`). A batch of step j
    of an epoch takes the windows j*batch .. (j+1)*batch - 1 of the epoch's order, wrapping around to its start
    when this process has fewer windows than the epoch's steps take (processes holding unequal shares of the
    windows all run the same steps). Each window comes with its lambda, drawn uniformly in [0, lambda_max)."""

    def __init__(
        self,
        readers: dict[int, ShardReader],
        reads: Sequence[Read],
        seed: int,
        rank: int,
        val_fraction: float,
        buffer_windows: int,
        lambda_max: float,
    ) -> None:
        self.readers, self.seed, self.rank = readers, seed, rank
        self.reads = [r for r in reads if r.train]
        self.val_fraction, self.lambda_max = val_fraction, lambda_max
        self.windows = sum(r.train for r in self.reads)
        if not self.windows:
            raise ValueError("this process's shards hold no training windows")
        self.buffer_windows = buffer_windows
        self._epoch: int | None = None
        self._buffers: dict[int, tuple[WindowSteps, np.ndarray]] = {}

    def _layout(self, epoch: int) -> None:
        """The epoch's order of reads, grouped into buffers, and where each buffer starts in the epoch."""
        if self._epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        order = [self.reads[i] for i in rng.permutation(len(self.reads))]
        groups: list[list[Read]] = [[]]
        filled = 0
        for read in order:
            if filled >= self.buffer_windows:
                groups.append([])
                filled = 0
            groups[-1].append(read)
            filled += read.train
        self._groups = groups
        self._starts = np.cumsum([0] + [sum(r.train for r in g) for g in groups])
        self._epoch, self._buffers = epoch, {}

    def _buffer(self, epoch: int, index: int) -> tuple[WindowSteps, np.ndarray]:
        """The shuffled windows of one buffer of the epoch and their lambdas (the last two read are kept)."""
        if index not in self._buffers:
            parts = []
            for read in self._groups[index]:
                users, steps = self.readers[read.shard].steps(read.start, read.stop)
                parts.append(take(steps, ~held_out(self.seed, read.shard, users, self.val_fraction)))
            windows = concat(parts)
            rng = np.random.default_rng([self.seed, epoch, self.rank, index, 1])
            order = rng.permutation(len(windows.loss_mask))
            lam = rng.uniform(0.0, self.lambda_max, size=len(order))
            while len(self._buffers) >= 2:  # the batch's previous buffer is kept: a batch may span two
                del self._buffers[next(iter(self._buffers))]
            self._buffers[index] = (take(windows, order), lam)
        return self._buffers[index]

    def batch(self, epoch: int, step: int, batch_size: int) -> tuple[WindowSteps, np.ndarray]:
        """The windows of `step` (0-based within the epoch) of `epoch` and their lambdas."""
        self._layout(epoch)
        positions = (step * batch_size + np.arange(batch_size)) % self.windows
        which = np.searchsorted(self._starts, positions, side="right") - 1
        parts, lams = [], []
        for index in dict.fromkeys(which.tolist()):  # the buffers in the order the batch meets them
            windows, lam = self._buffer(epoch, index)
            local = positions[which == index] - self._starts[index]
            parts.append(take(windows, local))
            lams.append(lam[local])
        return concat(parts), np.concatenate(lams)


def validation_batches(
    readers: dict[int, ShardReader],
    seed: int,
    val_fraction: float,
    lambda_max: float,
    read_windows: int,
    batch_windows: int = 2048,
) -> Iterator[tuple[WindowSteps, np.ndarray]]:
    """The held-out users' windows of the given shards, in file order, with lambdas fixed by (seed, shard, read)."""
    for shard, reader in sorted(readers.items()):
        for start in range(0, reader.windows, read_windows):
            stop = min(start + read_windows, reader.windows)
            users = reader.read("window_user", start, stop)
            lam = np.random.default_rng([seed, shard, start, 2]).uniform(0.0, lambda_max, size=stop - start)
            val = held_out(seed, shard, users, val_fraction)
            if not val.any():
                continue
            _, steps = reader.steps(start, stop)
            steps, lam = take(steps, val), lam[val]
            for i in range(0, len(lam), batch_windows):
                yield take(steps, slice(i, i + batch_windows)), lam[i : i + batch_windows]
