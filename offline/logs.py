"""Logged interactions (the log schema of README.md): load, validate, write.

One row per (user, interaction): user_id, t, action, cost, reward, f0..f{d-1}. Validation refuses the
whole file with one message naming the column and the first bad row (1-based, header excluded); nothing
downstream ever sees a partly valid log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REQUIRED = ("user_id", "t", "action", "cost", "reward")
_FEATURE_RE = re.compile(r"^f(\d+)$")


class LogValidationError(ValueError):
    """The logs break the log schema; the message names the column and the first bad row."""


@dataclass(frozen=True)
class Logs:
    """Validated logs, sorted by (user, t). Row i of every array is one interaction."""

    user: np.ndarray  # [n] int64 dense user index (0..n_users-1), in order of first appearance
    user_ids: np.ndarray  # [n_users] the original ids (str)
    t: np.ndarray  # [n] int64
    action: np.ndarray  # [n] int64
    cost: np.ndarray  # [n] float64
    reward: np.ndarray  # [n] float64
    features: np.ndarray  # [n, d] float32
    feature_names: tuple[str, ...]
    sha256: str  # hash of the validated content (training-data hash in manifests)

    @property
    def n_rows(self) -> int:
        return int(self.t.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_actions(self) -> int:
        return int(self.action.max()) + 1 if self.n_rows else 0

    def user_slices(self) -> np.ndarray:
        """Start offsets of each user's rows, plus the end: rows of user u are starts[u]:starts[u+1]."""
        return np.concatenate([[0], np.flatnonzero(np.diff(self.user)) + 1, [self.n_rows]])

    def subset_users(self, users: np.ndarray) -> Logs:
        """Logs of the given dense user indices (re-indexed 0..len-1, in the given order)."""
        users = np.asarray(users, dtype=np.int64)
        starts = self.user_slices()
        lengths = starts[users + 1] - starts[users]
        new_index = np.repeat(np.arange(len(users)), lengths)
        # each user's rows in order: its start plus the row's place among the user's rows
        first_of_user = np.cumsum(lengths) - lengths
        rows = starts[users][new_index] + np.arange(len(new_index)) - first_of_user[new_index]
        return Logs(
            user=new_index.astype(np.int64),
            user_ids=self.user_ids[users],
            t=self.t[rows],
            action=self.action[rows],
            cost=self.cost[rows],
            reward=self.reward[rows],
            features=self.features[rows],
            feature_names=self.feature_names,
            sha256=self.sha256,
        )

    def subset_rows(self, keep: np.ndarray) -> Logs:
        """Logs of the rows where `keep` [n] is true (users left with no row drop out; the others are re-indexed
        0..in order). Keep each user's rows a prefix of its trajectory (e.g. the decisions before a time), so
        that every kept row's history is kept too."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.n_rows,):
            raise ValueError(f"keep has shape {keep.shape}, the logs {self.n_rows} rows")
        kept_users, new_index = np.unique(self.user[keep], return_inverse=True)
        return Logs(
            user=new_index.astype(np.int64),
            user_ids=self.user_ids[kept_users],
            t=self.t[keep],
            action=self.action[keep],
            cost=self.cost[keep],
            reward=self.reward[keep],
            features=self.features[keep],
            feature_names=self.feature_names,
            sha256=self.sha256,
        )


def _read_table(path: Path) -> pa.Table:
    if not path.exists():
        raise LogValidationError(f"logs not found: {path}")
    suffix = path.suffix.lower()
    try:
        if path.is_dir() or suffix in (".parquet", ".pq"):
            return pads.dataset(str(path), format="parquet").to_table()
        if suffix in (".csv", ".gz") or path.name.endswith(".csv.gz"):
            return pacsv.read_csv(
                str(path),
                convert_options=pacsv.ConvertOptions(column_types={"user_id": pa.string()}),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise LogValidationError(f"cannot read logs {path}: {exc}") from exc
    raise LogValidationError(f"unsupported logs format {path.name!r}: use .parquet, a Parquet directory or .csv")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def _numeric(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.array([_to_float(v) for v in col.to_pylist()], dtype=np.float64)
    if col.null_count:
        arr = col.to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(pc.is_null(col).to_numpy(zero_copy_only=False), np.nan, arr)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise LogValidationError(f"column {name!r} has type {col.type}, expected a number")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)


def _to_float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class CheckedRows:
    """Columns of a table that passed the per-row checks of the log schema (as float64, user ids as str)."""

    user_ids: np.ndarray  # [n] object (str)
    columns: dict[str, np.ndarray]  # t, action, cost, reward, f0.. -> [n] float64
    feature_names: tuple[str, ...]


def check_rows(table: pa.Table, first_row: int = 1) -> CheckedRows:
    """The checks of the log schema that need one row at a time; `first_row` is the table's first row's number
    in the whole log, so a batch of a streamed log names the row of the log. Raises LogValidationError."""
    names = table.column_names
    for name in REQUIRED:
        if name not in names:
            raise LogValidationError(f"logs lack required column {name!r} (have: {', '.join(names)})")
    feature_cols = sorted((n for n in names if _FEATURE_RE.match(n)), key=lambda n: int(n[1:]))
    if not feature_cols:
        raise LogValidationError("logs have no feature columns (expected f0 .. f{d-1})")
    expected = [f"f{i}" for i in range(len(feature_cols))]
    if feature_cols != expected:
        missing = sorted(set(expected) - set(feature_cols), key=lambda n: int(n[1:]))
        raise LogValidationError(f"feature columns must be f0..f{len(feature_cols) - 1}; missing column {missing[0]!r}")
    offset = first_row - 1

    def first_bad(mask: np.ndarray) -> int:
        return _first_bad(mask) + offset

    uid_col = table.column("user_id")
    if uid_col.null_count:
        raise LogValidationError(
            f"column 'user_id' is empty at row {first_bad(pc.is_null(uid_col).to_numpy(zero_copy_only=False))}"
        )
    user_ids_raw = np.asarray(uid_col.cast(pa.string()).to_pylist(), dtype=object)
    empty = np.array([len(u) == 0 for u in user_ids_raw])
    if empty.any():
        raise LogValidationError(f"column 'user_id' is empty at row {first_bad(empty)}")

    columns: dict[str, np.ndarray] = {}
    for name in ("t", "action", "cost", "reward", *feature_cols):
        values = _numeric(table, name)
        bad = ~np.isfinite(values)
        if bad.any():
            row = _first_bad(bad)
            raise LogValidationError(
                f"column {name!r} has a missing or non-finite value ({values[row - 1]}) at row {row + offset}"
            )
        columns[name] = values
    for name in ("t", "action"):
        frac = columns[name] != np.round(columns[name])
        if frac.any():
            row = _first_bad(frac)
            raise LogValidationError(
                f"column {name!r} must be an integer; row {row + offset} has {columns[name][row - 1]}"
            )
    neg_action = columns["action"] < 0
    if neg_action.any():
        row = first_bad(neg_action)
        raise LogValidationError(f"column 'action' must be >= 0 (0 = no coupon); row {row} is negative")
    neg_cost = columns["cost"] < 0
    if neg_cost.any():
        row = _first_bad(neg_cost)
        raise LogValidationError(f"column 'cost' must be >= 0; row {row + offset} has {columns['cost'][row - 1]}")
    return CheckedRows(user_ids_raw, columns, tuple(feature_cols))


def duplicate_step_error(user_id: str, t: int, row: int) -> LogValidationError:
    return LogValidationError(f"column 't' cannot order user {user_id!r}: value {t} repeats at row {row}")


def validate_table(table: pa.Table) -> Logs:
    """Check the log schema and return sorted, typed arrays; raises LogValidationError naming column + row."""
    checked = check_rows(table)
    if table.num_rows == 0:
        raise LogValidationError("logs have no rows")
    user_ids_raw, columns, feature_cols = checked.user_ids, checked.columns, checked.feature_names

    unique_ids, first_pos, dense = np.unique(user_ids_raw.astype(str), return_index=True, return_inverse=True)
    # dense user index in order of first appearance, for stable, readable output
    order_of_first = np.argsort(first_pos)
    rank = np.empty_like(order_of_first)
    rank[order_of_first] = np.arange(len(order_of_first))
    user = rank[dense].astype(np.int64)
    t = columns["t"].astype(np.int64)
    order = np.lexsort((t, user))
    user_s, t_s = user[order], t[order]
    dup = (np.diff(user_s) == 0) & (np.diff(t_s) == 0)
    if dup.any():
        row = int(order[np.flatnonzero(dup)[0] + 1]) + 1
        raise duplicate_step_error(user_ids_raw[row - 1], int(t[row - 1]), row)

    features = np.stack([columns[c] for c in feature_cols], axis=1)[order].astype(np.float32)
    digest = hashlib.sha256()
    for arr in (user_s, t_s, columns["action"][order], columns["cost"][order], columns["reward"][order], features):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return Logs(
        user=user_s,
        user_ids=unique_ids[order_of_first].astype(str),
        t=t_s,
        action=columns["action"][order].astype(np.int64),
        cost=columns["cost"][order],
        reward=columns["reward"][order],
        features=features,
        feature_names=tuple(feature_cols),
        sha256=digest.hexdigest(),
    )


def load_logs(path: str | os.PathLike[str]) -> Logs:
    return validate_table(_read_table(Path(path)))


def logs_table(
    user_id: np.ndarray,
    t: np.ndarray,
    action: np.ndarray,
    cost: np.ndarray,
    reward: np.ndarray,
    features: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
) -> pa.Table:
    data: dict[str, object] = {
        "user_id": pa.array(user_id.astype(str)),
        "t": pa.array(t.astype(np.int64)),
        "action": pa.array(action.astype(np.int64)),
        "cost": pa.array(cost.astype(np.float64)),
        "reward": pa.array(reward.astype(np.float64)),
    }
    for j in range(features.shape[1]):
        data[f"f{j}"] = pa.array(features[:, j].astype(np.float64))
    for name, values in (extra or {}).items():
        data[name] = pa.array(values)
    return pa.table(data)


ROW_GROUP_ROWS = 65_536  # rows per Parquet row group: what a streaming reader holds of a file at a time


def write_logs(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write Parquet or CSV by the extension of `path`, atomically (temp file + rename)."""
    with log_writer(path) as write:
        write(table)
    return Path(path)


@contextlib.contextmanager
def log_writer(path: str | os.PathLike[str]) -> Iterator[Callable[[pa.Table], None]]:
    """A log written a table at a time (Parquet in row groups of `ROW_GROUP_ROWS`, or CSV by the extension of
    `path`), to a temporary file renamed to `path` when the block ends without an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise ValueError(f"unsupported output {path.name!r}: use .parquet or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with contextlib.ExitStack() as stack:
            parquet: list[pq.ParquetWriter] = []
            fh = stack.enter_context(open(tmp, "wb")) if suffix == ".csv" else None

            def write(table: pa.Table) -> None:
                if fh is not None:
                    if not fh.tell():  # a plain header line (pyarrow quotes names; ours never need quotes)
                        fh.write((",".join(table.column_names) + "\n").encode())
                    pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
                    return
                if not parquet:
                    parquet.append(stack.enter_context(pq.ParquetWriter(tmp, table.schema)))
                parquet[0].write_table(table, row_group_size=ROW_GROUP_ROWS)

            yield write
            if fh is None and not parquet:  # no table written: an empty file is no Parquet file
                raise ValueError(f"no rows to write to {path}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
