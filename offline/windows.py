"""Training windows of logs of any size: an engine groups and orders, the history rule computes.

`build_windows` reads a Parquet log (one file or a directory of files) in record batches, so no process holds
the whole log. Two engines, the same files:

- `duckdb` (default; one machine, out of core):
  1. each batch passes the log's per-row checks (offline/logs.py `check_rows`: errors name the column and
     the row of the whole log) and is staged, typed and tagged with its row number, as Parquet in
     `temp_directory`;
  2. DuckDB orders the staged rows by (shard, user_id, t), the shard by `shard_of`, out of core: past
     `memory_limit` it spills to `temp_directory`.
- `spark` (a cluster, or Spark's local mode): Spark reads the log, its tasks run the same per-row checks on
  their batches (each row numbered from its file's place in the log and its index in the file), then Spark
  partitions the rows by shard and orders each partition by (shard, user_id, t), spilling as it sorts.

Then, in the process (DuckDB) or in each Spark task (on its partition's rows, streamed in order):
3. the ordered rows are cut at user boundaries into groups of users, and each group goes through the same
   code as the in-memory path (offline/trajectories.py `build_trajectories`, `Trajectories.windows`,
   `window_steps`), so a user's windows are the same arrays whichever path and engine built them;
4. each shard is written as one `.npz` file of `WindowSteps` (what the history rule, contract/inputs.py,
   turns into model inputs once a lambda and the to-go targets are chosen), with `manifest.json` beside
   them. The manifest's to-go targets and scales are merged shard by shard in shard order, so they too are
   the same bits from either engine.

Shard files hold the "value" objective's windows (the default); the hindsight ablations read whole logs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from contract.inputs import History
from offline.logs import REQUIRED, Logs, LogValidationError, check_rows, duplicate_step_error
from offline.trajectories import WindowSteps, build_trajectories, window_steps

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

FORMAT = "saco-windows/1"
MANIFEST = "manifest.json"
SHARD_RULE = "int(md5(user_id as UTF-8).hexdigest()[:15], 16) % shards"
ENGINES = ("duckdb", "spark")
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


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((Path(directory) / MANIFEST).read_text())
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
class Spread:
    """Count, mean and sum of squared deviations of values, merged part by part (Chan et al.), free of the
    cancellation of sums of squares."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        if not len(values):
            return cls()
        mean = float(values.mean())
        return cls(len(values), mean, float(np.square(values - mean).sum()))

    def merge(self, other: Spread) -> None:
        if not other.n:
            return
        if not self.n:
            self.n, self.mean, self.m2 = other.n, other.mean, other.m2
            return
        delta, total = other.mean - self.mean, self.n + other.n
        self.mean += delta * other.n / total
        self.m2 += other.m2 + delta**2 * self.n * other.n / total
        self.n = total

    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


@dataclass
class _Totals:
    """The users' total return and cost: the to-go targets and scales of training, merged shard by shard."""

    rtg: Spread = field(default_factory=Spread)
    ctg: Spread = field(default_factory=Spread)

    @property
    def users(self) -> int:
        return self.rtg.n

    def merge(self, other: _Totals) -> None:
        self.rtg.merge(other.rtg)
        self.ctg.merge(other.ctg)

    def summary(self) -> dict[str, float]:
        # as Trajectories.initial_targets / scales (a zero spread scales by 1)
        return {
            "initial_rtg": self.rtg.mean,
            "initial_ctg": self.ctg.mean,
            "rtg_scale": self.rtg.std() or 1.0,
            "ctg_scale": self.ctg.std() or 1.0,
        }


@dataclass(frozen=True)
class _Written:
    """A shard file written, with its users' totals."""

    shard: int
    file: ShardFile
    totals: _Totals


def build_windows(
    logs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    context_length: int,
    shards: int = 16,
    memory_limit: str = "1GB",
    temp_directory: str | os.PathLike[str] | None = None,
    batch_rows: int = 65_536,
    threads: int | None = None,
    *,
    engine: str = "duckdb",
    spark: SparkSession | None = None,
    spark_master: str | None = None,
    spark_conf: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write the user-sharded training windows of a Parquet log (file or directory) to `out`; returns the
    manifest. Both engines write the same files.

    `engine` "duckdb": DuckDB sorts within `memory_limit` on `threads` (default: every core), spilling
    beyond it to `temp_directory` (default `out/.spill`); the manifest's `spilled_bytes` is what it wrote.
    `engine` "spark": the job runs on `spark` (a session), else on the active session, else on a new one at
    `spark_master` (default: spark-submit's, else `local[threads or *]`) with `spark_conf`; a session made
    here is stopped at the end. Its tasks write the shard files themselves: `out` (and the log) must be a
    path every machine of the cluster sees (a shared file system). Spark spills its sort to
    `temp_directory` when it starts the session; `spilled_bytes` is null (Spark's spill is in its metrics)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
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
    spill.mkdir(parents=True, exist_ok=True)
    spilled_bytes: int | None
    if engine == "duckdb":
        written, spilled_bytes = _duckdb_windows(
            dataset, out_dir, spill, context_length, shards, feature_names, memory_limit, batch_rows, threads
        )
    else:
        master = spark_master or (None if threads is None else f"local[{int(threads)}]")
        with _spark_session(spark, master, spill, batch_rows, spark_conf or {}) as session:
            written = _spark_windows(session, dataset, out_dir, context_length, shards, feature_names)
        spilled_bytes = None
    files: list[ShardFile] = []
    totals = _Totals()
    by_shard = {w.shard: w for w in written}
    for k in range(shards):  # a shard no user falls to is an empty file; the totals merged in shard order
        done = by_shard.get(k) or _write_shard(_ShardParts(k), out_dir, context_length, len(feature_names))
        files.append(done.file)
        totals.merge(done.totals)
    if totals.users == 0:
        raise LogValidationError("logs have no rows")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "engine": engine,
        "context_length": context_length,
        "feature_names": list(feature_names),
        "shards": shards,
        "shard_rule": SHARD_RULE,
        "rows": sum(f.rows for f in files),
        "users": totals.users,
        "windows": sum(f.windows for f in files),
        **totals.summary(),
        "spilled_bytes": spilled_bytes,
        "files": [asdict(f) for f in files],
    }
    _write_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _checked_schema(feature_names: tuple[str, ...]) -> pa.Schema:
    """The rows as the engines order them: typed, checked, numbered (1-based, in the log's order)."""
    return pa.schema(
        [("user_id", pa.string()), ("t", pa.int64()), ("action", pa.int64()), ("cost", pa.float64())]
        + [("reward", pa.float64())]
        + [(name, pa.float64()) for name in feature_names]
        + [("row", pa.int64())]
    )


def _checked_batch(table: pa.Table, first_row: int, feature_names: tuple[str, ...]) -> pa.RecordBatch:
    """Rows first_row.. of the log after the log's per-row checks (which name the log's row), typed."""
    checked = check_rows(table, first_row)
    columns = checked.columns
    rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    return pa.record_batch(
        [pa.array(checked.user_ids.astype(str)), pa.array(columns["t"].astype(np.int64))]
        + [pa.array(columns["action"].astype(np.int64)), pa.array(columns["cost"])]
        + [pa.array(columns["reward"])]
        + [pa.array(columns[name]) for name in feature_names]
        + [pa.array(rows)],
        schema=_checked_schema(feature_names),
    )


def _duckdb_windows(
    dataset: pads.Dataset,
    out_dir: Path,
    spill: Path,
    context_length: int,
    shards: int,
    feature_names: tuple[str, ...],
    memory_limit: str,
    batch_rows: int,
    threads: int | None,
) -> tuple[list[_Written], int]:
    # the checked, typed rows are staged as Parquet, so that DuckDB orders them with its own Parquet scan and
    # external sort (an Arrow stream handed to DuckDB held more memory the longer the log)
    staged = spill / f"checked-{os.getpid()}.parquet"
    try:
        with pq.ParquetWriter(staged, _checked_schema(feature_names)) as writer:
            first_row = 1
            for batch in _batches(dataset, batch_rows):
                table = pa.Table.from_batches([batch])
                writer.write_batch(_checked_batch(table, first_row, feature_names), row_group_size=batch_rows)
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
            return list(_write_shards(ordered, out_dir, context_length, feature_names)), spilled_bytes
        finally:
            con.close()
    finally:
        staged.unlink(missing_ok=True)


def _batches(dataset: pads.Dataset, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The log's record batches in the order `load_logs` reads its rows: file by file, each read one batch at
    a time (the dataset scanner reads ahead of a slow consumer and its memory grows with the file)."""
    for fragment in dataset.get_fragments():
        with pq.ParquetFile(fragment.path, pre_buffer=False) as file:
            yield from file.iter_batches(batch_size=batch_rows, use_threads=False)


def _write_shards(
    ordered: Iterable[pa.RecordBatch], out_dir: Path, context_length: int, feature_names: tuple[str, ...]
) -> Iterator[_Written]:
    """Consume rows ordered by (shard, user_id, t): groups of whole users -> windows -> one file per shard
    met (of any shards, each in one run of rows), each yielded as soon as its last row has been read."""
    current: _ShardParts | None = None
    finished: set[int] = set()
    pending: pa.Table | None = None  # the rows of the last user of the batch, who may go on in the next

    def take(group: pa.Table) -> Iterator[_Written]:
        nonlocal current
        shard_col = group.column("shard").to_numpy()
        for shard in np.unique(shard_col):
            if current is not None and current.shard != shard:
                yield _write_shard(current, out_dir, context_length, len(feature_names))
                finished.add(current.shard)
                current = None
            if current is None:
                if int(shard) in finished:
                    raise RuntimeError(f"the rows of shard {int(shard)} came in more than one run: not ordered")
                current = _ShardParts(int(shard))
            part = group.filter(pa.array(shard_col == shard))
            logs = _group_logs(part, feature_names)
            traj = build_trajectories(logs, context_length)
            window = traj.windows()
            first = traj.position == 0
            steps = window_steps(traj, window)
            current.groups.append(
                _Group(logs.user_ids, traj.rtg[first], traj.ctg[first], logs.user[window[:, -1]], steps)
            )
            current.rows += logs.n_rows

    for batch in ordered:
        if not batch.num_rows:
            continue
        table = pa.Table.from_batches([batch])
        if pending is not None:
            table = pa.concat_tables([pending, table])
        users = np.asarray(table.column("user_id").to_numpy(zero_copy_only=False))
        others = np.flatnonzero(users != users[-1])
        keep = int(others[-1]) + 1 if len(others) else 0
        if keep:
            yield from take(table.slice(0, keep))
        pending = table.slice(keep)
    if pending is not None and pending.num_rows:
        yield from take(pending)
    if current is not None:
        yield _write_shard(current, out_dir, context_length, len(feature_names))


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


def _write_shard(parts: _ShardParts, out_dir: Path, context_length: int, feature_dim: int) -> _Written:
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
    totals = _Totals(Spread.of(arrays["user_return"]), Spread.of(arrays["user_cost"]))
    return _Written(
        parts.shard, ShardFile(name, parts.rows, users, windows, hashlib.sha256(content).hexdigest()), totals
    )


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


# ---- the Spark engine ------------------------------------------------------------------------------------
# Spark reads the log and its tasks run the per-row checks (`_spark_checked`); Spark partitions the checked
# rows by shard and sorts each partition by (shard, user_id, t, row); each task then streams its partition
# through `_write_shards` (`_spark_write`), writing its shards' files and answering one summary row each.

_SUMMARY = (
    "shard long, file string, rows long, users long, windows long, sha256 string, "
    "rtg_n long, rtg_mean double, rtg_m2 double, ctg_n long, ctg_mean double, ctg_m2 double"
)
_FILE, _INDEX = "_saco_file", "_saco_row_index"
_ERROR = re.compile(r"LogValidationError: (.+)")


@contextlib.contextmanager
def _spark_session(
    spark: SparkSession | None, master: str | None, spill: Path, batch_rows: int, conf: Mapping[str, str]
) -> Iterator[SparkSession]:
    """`spark` if given, else the active session, else a new one, stopped on exit."""
    from pyspark.sql import SparkSession

    session = spark or SparkSession.getActiveSession()
    made = session is None
    if session is None:
        # local mode's Python workers run this interpreter (a cluster sets spark.pyspark.python)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = SparkSession.builder.appName("saco windows")
        if master is not None:
            builder = builder.master(master)
        settings = {
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.local.dir": str(spill),
            "spark.executorEnv.PYTHONWARNINGS": "ignore::FutureWarning",
            **conf,
        }
        for key, value in settings.items():
            builder = builder.config(key, value)
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
    session.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    try:
        with warnings.catch_warnings():  # pyspark's own, about pandas versions it has not been tried with
            warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")
            yield session
    finally:
        if made:
            session.stop()


def _local_path(uri: str) -> str:
    """A file's path from Spark's `_metadata.file_path` or a `file:` URI."""
    return os.path.normpath(unquote(urlparse(uri).path)) if ":" in uri.split("/", 1)[0] else os.path.normpath(uri)


def _spark_windows(
    spark: SparkSession,
    dataset: pads.Dataset,
    out_dir: Path,
    context_length: int,
    shards: int,
    feature_names: tuple[str, ...],
) -> list[_Written]:
    from pyspark.sql import functions as F

    paths = [fragment.path for fragment in dataset.get_fragments()]
    counts = [pq.read_metadata(p).num_rows for p in paths]
    first_rows = np.cumsum([1, *counts[:-1]]).tolist()  # a row's number: its file's first plus its index
    offsets = {os.path.normpath(os.path.abspath(p)): int(r) for p, r in zip(paths, first_rows, strict=True)}
    log = spark.read.parquet(*(Path(p).absolute().as_uri() for p in paths)).select(
        *REQUIRED,
        *feature_names,
        F.col("_metadata.file_path").alias(_FILE),
        F.col("_metadata.row_index").alias(_INDEX),
    )
    spark_types = {pa.string(): "string", pa.int64(): "long", pa.float64(): "double"}
    ddl = ", ".join(f"{f.name} {spark_types[f.type]}" for f in _checked_schema(feature_names))
    checked = log.mapInArrow(
        functools.partial(_spark_checked, offsets=offsets, feature_names=feature_names, shards=shards),
        f"{ddl}, shard long",
    )
    ordered = checked.repartition(shards, "shard").sortWithinPartitions("shard", "user_id", "t", "row")
    summaries = ordered.mapInArrow(
        functools.partial(
            _spark_write, out=str(out_dir.absolute()), context_length=context_length, feature_names=feature_names
        ),
        _SUMMARY,
    )
    try:
        rows = summaries.collect()
    except Exception as exc:
        found = _ERROR.findall(str(exc))
        if not found:
            raise
        raise _first_bad_row(log, offsets, feature_names) or LogValidationError(found[-1].strip()) from None
    return [
        _Written(
            int(r["shard"]),
            ShardFile(r["file"], int(r["rows"]), int(r["users"]), int(r["windows"]), r["sha256"]),
            _Totals(
                Spread(int(r["rtg_n"]), float(r["rtg_mean"]), float(r["rtg_m2"])),
                Spread(int(r["ctg_n"]), float(r["ctg_mean"]), float(r["ctg_m2"])),
            ),
        )
        for r in rows
    ]


def _numbered_runs(batch: pa.RecordBatch, offsets: Mapping[str, int]) -> Iterator[tuple[pa.Table, int]]:
    """A batch of Spark's scan as runs of consecutive rows of the log, each with its first row's number."""
    table = pa.Table.from_batches([batch])
    files = np.asarray(table.column(_FILE).to_numpy(zero_copy_only=False)).astype(str)
    unique, inverse = np.unique(files, return_inverse=True)
    first = np.array([offsets[_local_path(f)] for f in unique], dtype=np.int64)[inverse]
    rows = first + table.column(_INDEX).to_numpy()
    order = np.argsort(rows, kind="stable")
    table, rows = table.drop_columns([_FILE, _INDEX]).take(pa.array(order)), rows[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1, [len(rows)]])
    for a, b in itertools.pairwise(starts.tolist()):
        yield table.slice(a, b - a), int(rows[a])


def _spark_checked(
    batches: Iterator[pa.RecordBatch], offsets: Mapping[str, int], feature_names: tuple[str, ...], shards: int
) -> Iterator[pa.RecordBatch]:
    """A Spark task's rows after the per-row checks, typed, numbered and tagged with their shard."""
    for batch in batches:
        if not batch.num_rows:
            continue
        for run, first_row in _numbered_runs(batch, offsets):
            checked = _checked_batch(run, first_row, feature_names)
            users = np.asarray(checked.column(0).to_numpy(zero_copy_only=False))
            unique, inverse = np.unique(users, return_inverse=True)
            shard = np.array([shard_of(str(u), shards) for u in unique], dtype=np.int64)[inverse]
            yield pa.RecordBatch.from_arrays([*checked.columns, pa.array(shard)], [*checked.schema.names, "shard"])


def _spark_write(
    batches: Iterator[pa.RecordBatch], out: str, context_length: int, feature_names: tuple[str, ...]
) -> Iterator[pa.RecordBatch]:
    """A Spark task's partition, ordered by (shard, user_id, t, row), written as its shards' files."""
    for done in _write_shards(batches, Path(out), context_length, feature_names):
        f, rtg, ctg = done.file, done.totals.rtg, done.totals.ctg
        yield pa.RecordBatch.from_pylist(
            [
                {
                    "shard": done.shard,
                    "file": f.file,
                    "rows": f.rows,
                    "users": f.users,
                    "windows": f.windows,
                    "sha256": f.sha256,
                    "rtg_n": rtg.n,
                    "rtg_mean": rtg.mean,
                    "rtg_m2": rtg.m2,
                    "ctg_n": ctg.n,
                    "ctg_mean": ctg.mean,
                    "ctg_m2": ctg.m2,
                }
            ]
        )


def _spark_first_errors(
    batches: Iterator[pa.RecordBatch], offsets: Mapping[str, int], feature_names: tuple[str, ...]
) -> Iterator[pa.RecordBatch]:
    """Each batch's first failed check, as (row, message), instead of the task failing on it."""
    for batch in batches:
        if not batch.num_rows:
            continue
        for run, first_row in _numbered_runs(batch, offsets):
            try:
                check_rows(run, first_row)
            except LogValidationError as exc:
                yield pa.RecordBatch.from_pylist([{"row": _row_named(str(exc), first_row), "message": str(exc)}])
                break


def _row_named(message: str, default: int) -> int:
    found = re.search(r"row (\d+)", message)
    return int(found.group(1)) if found else default


def _first_bad_row(
    log: DataFrame, offsets: Mapping[str, int], feature_names: tuple[str, ...]
) -> LogValidationError | None:
    """After a task refused a row: the log's first row that fails a check (tasks fail in no fixed order, so
    the row named is the same whichever failed first); None when no row fails one (a repeated step)."""
    errors = log.mapInArrow(
        functools.partial(_spark_first_errors, offsets=offsets, feature_names=feature_names), "row long, message string"
    ).collect()
    if not errors:
        return None
    return LogValidationError(min(errors, key=lambda e: int(e["row"]))["message"])
