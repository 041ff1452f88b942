"""Training windows of logs of any size on one machine: DuckDB groups and orders, the history rule computes.

`build_windows` reads a Parquet log (one file or a directory of files) in record batches, so no process holds
the whole log:

1. each batch passes the log's per-row checks (offline/logs.py `check_rows`: errors name the column and the
   row of the whole log) and is staged, typed and tagged with its row number, as Parquet in `temp_directory`;
2. DuckDB orders the staged rows by (shard, user_id, t), the shard by `shard_of`, out of core: past
   `memory_limit` it spills to `temp_directory`;
3. the ordered rows are cut at user boundaries into groups of users, and each group goes through the same
   code as the in-memory path (offline/trajectories.py `build_trajectories`, `Trajectories.windows`,
   `window_steps`), so a user's windows are the same arrays whichever path built them;
4. each shard is written as one `.npz` file of `WindowSteps` (what the history rule, contract/inputs.py,
   turns into model inputs once a lambda and the to-go targets are chosen), with `manifest.json` beside
   them.

Shard files hold the "value" objective's windows (the default); the hindsight ablations read whole logs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from contract.inputs import History
from offline.logs import Logs, LogValidationError, check_rows, duplicate_step_error
from offline.trajectories import WindowSteps, build_trajectories, window_steps

FORMAT = "saco-windows/1"
MANIFEST = "manifest.json"
SHARD_RULE = "int(md5(user_id as UTF-8).hexdigest()[:15], 16) % shards"
_HISTORY_FIELDS = ("states", "actions", "reward", "cost", "timesteps", "mask", "reward_before_last", "cost_before_last")


def shard_of(user_id: str, shards: int) -> int:
    """The shard that holds a user's windows (SHARD_RULE): stable across runs, machines and versions."""
    return int(hashlib.md5(user_id.encode()).hexdigest()[:15], 16) % shards


def _shard_sql(shards: int) -> str:
    # SHARD_RULE in DuckDB's SQL: the first 15 hex digits (60 bits) fit a BIGINT
    return f"('0x' || substr(md5(user_id), 1, 15))::BIGINT % {int(shards)}"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class WindowShard:
    """One shard's windows: users (sorted by id), and per window its user and the user's step it ends at."""

    user_ids: np.ndarray  # [U] str
    user_return: np.ndarray  # [U] f64: each user's total reward (the return-to-go at the first step)
    user_cost: np.ndarray  # [U] f64
    window_user: np.ndarray  # [W] i64 index into user_ids
    steps: WindowSteps

    @property
    def windows(self) -> int:
        return int(self.window_user.shape[0])


def load_shard(path: str | os.PathLike[str]) -> WindowShard:
    with np.load(path, allow_pickle=False) as data:
        history = History(*(data[name] for name in _HISTORY_FIELDS))
        return WindowShard(
            user_ids=data["user_ids"],
            user_return=data["user_return"],
            user_cost=data["user_cost"],
            window_user=data["window_user"],
            steps=WindowSteps(history, data["loss_mask"], data["value_targets"]),
        )


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, object]:
    manifest: dict[str, object] = json.loads((Path(directory) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a window directory of format {FORMAT} (found {manifest.get('format')!r})")
    return manifest


@dataclass(frozen=True)
class ShardFile:
    """A shard's entry in the manifest."""

    file: str
    rows: int
    users: int
    windows: int
    sha256: str


@dataclass(frozen=True)
class _Group:
    """The windows of one group of users of a shard."""

    user_ids: np.ndarray
    user_return: np.ndarray
    user_cost: np.ndarray
    window_user: np.ndarray  # index into this group's user_ids
    steps: WindowSteps


@dataclass
class _ShardParts:
    """A shard's windows as they are built, one group of users at a time."""

    shard: int
    rows: int = 0
    groups: list[_Group] = field(default_factory=list)


@dataclass
class _Spread:
    """Count, mean and sum of squared deviations of a stream of values, merged group by group (Chan et al.),
    free of the cancellation of sums of squares."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        n, mean = len(values), float(values.mean())
        m2 = float(np.square(values - mean).sum())
        delta, total = mean - self.mean, self.n + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.n * n / total
        self.n = total

    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


@dataclass
class _Totals:
    """The users' total return and cost, streamed: the to-go targets and scales of training."""

    rtg: _Spread = field(default_factory=_Spread)
    ctg: _Spread = field(default_factory=_Spread)

    @property
    def users(self) -> int:
        return self.rtg.n

    def add(self, user_return: np.ndarray, user_cost: np.ndarray) -> None:
        self.rtg.add(user_return)
        self.ctg.add(user_cost)

    def summary(self) -> dict[str, float]:
        # as Trajectories.initial_targets / scales (a zero spread scales by 1)
        return {
            "initial_rtg": self.rtg.mean,
            "initial_ctg": self.ctg.mean,
            "rtg_scale": self.rtg.std() or 1.0,
            "ctg_scale": self.ctg.std() or 1.0,
        }


def build_windows(
    logs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    context_length: int,
    shards: int = 16,
    memory_limit: str = "1GB",
    temp_directory: str | os.PathLike[str] | None = None,
    batch_rows: int = 65_536,
    threads: int | None = None,
) -> dict[str, object]:
    """Write the user-sharded training windows of a Parquet log (file or directory) to `out`; returns the
    manifest. DuckDB sorts within `memory_limit` on `threads` (default: every core), spilling beyond it; the
    manifest's `spilled_bytes` is what it wrote to disk for the sort."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    path = Path(logs)
    if not path.exists():
        raise LogValidationError(f"logs not found: {path}")
    try:
        dataset = pads.dataset(str(path), format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise LogValidationError(f"cannot read logs {path}: {exc}") from exc
    feature_names = check_rows(dataset.schema.empty_table()).feature_names
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    spill = Path(temp_directory) if temp_directory is not None else out_dir / ".spill"

    schema = pa.schema(
        [("user_id", pa.string()), ("t", pa.int64()), ("action", pa.int64()), ("cost", pa.float64())]
        + [("reward", pa.float64())]
        + [(name, pa.float64()) for name in feature_names]
        + [("row", pa.int64())]
    )
    spill.mkdir(parents=True, exist_ok=True)
    # the checked, typed rows are staged as Parquet, so that DuckDB orders them with its own Parquet scan and
    # external sort (an Arrow stream handed to DuckDB held more memory the longer the log)
    staged = spill / f"checked-{os.getpid()}.parquet"
    try:
        with pq.ParquetWriter(staged, schema) as writer:
            first_row = 1
            for batch in _batches(dataset, batch_rows):
                checked = check_rows(pa.Table.from_batches([batch]), first_row)
                columns = checked.columns
                rows = np.arange(first_row, first_row + batch.num_rows, dtype=np.int64)
                writer.write_batch(
                    pa.record_batch(
                        [pa.array(checked.user_ids.astype(str)), pa.array(columns["t"].astype(np.int64))]
                        + [pa.array(columns["action"].astype(np.int64)), pa.array(columns["cost"])]
                        + [pa.array(columns["reward"])]
                        + [pa.array(columns[name]) for name in feature_names]
                        + [pa.array(rows)],
                        schema=schema,
                    ),
                    row_group_size=batch_rows,
                )
                first_row += batch.num_rows
        con = duckdb.connect()
        try:
            con.execute(f"SET memory_limit = {_sql_text(memory_limit)}")
            con.execute(f"SET temp_directory = {_sql_text(str(spill))}")
            if threads is not None:
                con.execute(f"SET threads = {int(threads)}")
            query = (
                f"SELECT *, {_shard_sql(shards)} AS shard FROM read_parquet({_sql_text(str(staged))}) "
                "ORDER BY shard, user_id, t, row"
            )
            batches = iter(con.sql(query).to_arrow_reader(batch_rows))
            first = next(batches, None)  # the sort is done (its runs spilled) once the first rows come
            spilled = con.cursor().execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchone()
            spilled_bytes = int(spilled[0]) if spilled else 0
            ordered = itertools.chain([] if first is None else [first], batches)
            written = _write_shards(ordered, out_dir, context_length, shards, feature_names)
        finally:
            con.close()
    finally:
        staged.unlink(missing_ok=True)
    shard_files, totals = written
    if totals.users == 0:
        raise LogValidationError("logs have no rows")
    manifest: dict[str, object] = {
        "format": FORMAT,
        "context_length": context_length,
        "feature_names": list(feature_names),
        "shards": shards,
        "shard_rule": SHARD_RULE,
        "rows": sum(f.rows for f in shard_files),
        "users": totals.users,
        "windows": sum(f.windows for f in shard_files),
        **totals.summary(),
        "spilled_bytes": spilled_bytes,
        "files": [asdict(f) for f in shard_files],
    }
    _write_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _batches(dataset: pads.Dataset, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The log's record batches in the order `load_logs` reads its rows: file by file, each read one batch at
    a time (the dataset scanner reads ahead of a slow consumer and its memory grows with the file)."""
    for fragment in dataset.get_fragments():
        with pq.ParquetFile(fragment.path, pre_buffer=False) as file:
            yield from file.iter_batches(batch_size=batch_rows, use_threads=False)


def _write_shards(
    ordered: Iterable[pa.RecordBatch], out_dir: Path, context_length: int, shards: int, feature_names: tuple[str, ...]
) -> tuple[list[ShardFile], _Totals]:
    """Consume rows ordered by (shard, user_id, t): groups of whole users -> windows -> one file per shard."""
    files: list[ShardFile] = []
    totals = _Totals()
    current = _ShardParts(0)
    pending: pa.Table | None = None  # the rows of the last user of the batch, who may go on in the next

    def flush_through(shard: int) -> None:
        nonlocal current
        while current.shard < shard:
            files.append(_write_shard(current, out_dir, context_length, len(feature_names)))
            current = _ShardParts(current.shard + 1)

    def take(group: pa.Table) -> None:
        shard_col = group.column("shard").to_numpy()
        for shard in np.unique(shard_col):
            flush_through(int(shard))
            part = group.filter(pa.array(shard_col == shard))
            logs = _group_logs(part, feature_names)
            traj = build_trajectories(logs, context_length)
            window = traj.windows()
            first = traj.position == 0
            group_totals = traj.rtg[first], traj.ctg[first]
            totals.add(*group_totals)
            steps = window_steps(traj, window)
            current.groups.append(_Group(logs.user_ids, *group_totals, logs.user[window[:, -1]], steps))
            current.rows += logs.n_rows

    for batch in ordered:
        table = pa.Table.from_batches([batch])
        if pending is not None:
            table = pa.concat_tables([pending, table])
        users = np.asarray(table.column("user_id").to_numpy(zero_copy_only=False))
        others = np.flatnonzero(users != users[-1])
        keep = int(others[-1]) + 1 if len(others) else 0
        if keep:
            take(table.slice(0, keep))
        pending = table.slice(keep)
    if pending is not None and pending.num_rows:
        take(pending)
    flush_through(shards)
    return files, totals


def _group_logs(group: pa.Table, feature_names: tuple[str, ...]) -> Logs:
    """Logs of a group of whole users, rows ordered by (user_id, t); refuses a repeated (user, t)."""
    user_ids = np.asarray(group.column("user_id").to_numpy(zero_copy_only=False)).astype(str)
    t = group.column("t").to_numpy()
    new_user = np.concatenate([[True], user_ids[1:] != user_ids[:-1]])
    repeat = np.flatnonzero(~new_user[1:] & (t[1:] == t[:-1]))
    if len(repeat):
        i = int(repeat[0]) + 1
        raise duplicate_step_error(str(user_ids[i]), int(t[i]), int(group.column("row")[i].as_py()))
    user = np.cumsum(new_user) - 1
    features = np.stack([group.column(name).to_numpy() for name in feature_names], axis=1).astype(np.float32)
    return Logs(
        user=user.astype(np.int64),
        user_ids=user_ids[new_user],
        t=t,
        action=group.column("action").to_numpy(),
        cost=group.column("cost").to_numpy(),
        reward=group.column("reward").to_numpy(),
        features=features,
        feature_names=feature_names,
        sha256="",
    )


def _write_shard(parts: _ShardParts, out_dir: Path, context_length: int, feature_dim: int) -> ShardFile:
    groups = parts.groups or [
        _Group(
            np.zeros(0, "<U1"),
            np.zeros(0),
            np.zeros(0),
            np.zeros(0, np.int64),
            _empty_steps(context_length, feature_dim),
        )
    ]
    user_offsets = np.cumsum([0] + [len(g.user_ids) for g in groups])
    arrays: dict[str, np.ndarray] = {
        "user_ids": np.concatenate([g.user_ids for g in groups]),
        "user_return": np.concatenate([g.user_return for g in groups]),
        "user_cost": np.concatenate([g.user_cost for g in groups]),
        "window_user": np.concatenate(
            [g.window_user + offset for g, offset in zip(groups, user_offsets[:-1], strict=True)]
        ),
        "loss_mask": np.concatenate([g.steps.loss_mask for g in groups]),
        "value_targets": np.concatenate([g.steps.value_targets for g in groups]),
    }
    for name in _HISTORY_FIELDS:
        arrays[name] = np.concatenate([getattr(g.steps.history, name) for g in groups])
    name = f"shard-{parts.shard:05d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out_dir)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    content = Path(tmp).read_bytes()
    os.replace(tmp, out_dir / name)
    users, windows = int(arrays["user_ids"].shape[0]), int(arrays["window_user"].shape[0])
    return ShardFile(name, parts.rows, users, windows, hashlib.sha256(content).hexdigest())


def _empty_steps(context_length: int, feature_dim: int) -> WindowSteps:
    length = context_length
    history = History(
        np.zeros((0, length, feature_dim), np.float32),
        np.zeros((0, length), np.int64),
        np.zeros((0, length), np.int64),
        np.zeros((0, length), np.int64),
        np.zeros((0, length), np.int64),
        np.zeros((0, length), np.bool_),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    return WindowSteps(history, np.zeros((0, length), np.bool_), np.zeros((0, length, 4), np.float32))


def _write_atomic(path: Path, content: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    os.replace(tmp, path)
