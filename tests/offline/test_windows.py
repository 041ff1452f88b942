from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offline.logs import LogValidationError, load_logs
from offline.trajectories import build_trajectories, window_steps
from offline.windows import build_windows, load_shard, read_manifest, shard_of
from research.simulate import simulate_logs
from research.world import WorldConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

CONTEXT = 4
SHARDS = 5


def write_log_directory(table: pa.Table, directory: Path, files: int = 3) -> Path:
    """The log as a Parquet directory of several files, rows shuffled (users interleaved, t out of order)."""
    order = np.random.default_rng(1).permutation(table.num_rows)
    table = table.take(pa.array(order))
    directory.mkdir()
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), directory / f"part-{i}.parquet")
    return directory


@pytest.fixture(scope="module")
def log_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = simulate_logs(WorldConfig(users=120, rounds=11, seed=3))
    # users of different lengths: drop some of the later rounds of a third of the users
    user = np.char.lstrip(table.column("user_id").to_numpy(zero_copy_only=False).astype(str), "u").astype(int)
    t = table.column("t").to_numpy()
    keep = ~((user % 3 == 0) & (t >= 2 + user % 7))
    return write_log_directory(table.filter(pa.array(keep)), tmp_path_factory.mktemp("logs") / "logs")


def build(log_directory: Path, out: Path, memory_limit: str = "64MB") -> dict[str, Any]:
    # small batches: the rows reach the history rule in many groups of users
    return build_windows(
        log_directory,
        out,
        CONTEXT,
        shards=SHARDS,
        memory_limit=memory_limit,
        temp_directory=out / "spill",
        batch_rows=97,
        threads=1,
    )


def test_out_of_core_windows_equal_the_in_memory_windows(log_directory: Path, tmp_path: Path) -> None:
    manifest = build(log_directory, tmp_path / "w")
    logs = load_logs(log_directory)
    traj = build_trajectories(logs, CONTEXT)
    windows = traj.windows()
    memory = window_steps(traj, windows)
    memory_user = logs.user_ids[logs.user[windows[:, -1]]]
    rng = np.random.default_rng(0)
    lam = rng.uniform(0, 2, len(windows))
    initial_rtg, initial_ctg = traj.initial_targets()
    memory_batch = memory.batch(lam, initial_rtg, initial_ctg, 8)

    assert manifest["rows"] == logs.n_rows and manifest["users"] == logs.n_users
    assert manifest["windows"] == len(windows)
    assert manifest["initial_rtg"] == pytest.approx(initial_rtg, rel=1e-12)
    assert manifest["initial_ctg"] == pytest.approx(initial_ctg, rel=1e-12)
    assert (manifest["rtg_scale"], manifest["ctg_scale"]) == pytest.approx(traj.scales(), rel=1e-12)

    compared = 0
    for entry in manifest["files"]:
        shard = load_shard(tmp_path / "w" / entry["file"])
        shard_lam, memory_rows = np.zeros(shard.windows), np.zeros(shard.windows, np.int64)
        for i, user_id in enumerate(shard.user_ids):
            mine = np.flatnonzero(shard.window_user == i)
            theirs = np.flatnonzero(memory_user == user_id)
            assert len(mine) == len(theirs) > 0
            for name in ("states", "actions", "reward", "cost", "timesteps", "mask"):
                np.testing.assert_array_equal(
                    getattr(shard.steps.history, name)[mine], getattr(memory.history, name)[theirs], err_msg=name
                )
            for name in ("reward_before_last", "cost_before_last"):
                np.testing.assert_array_equal(
                    getattr(shard.steps.history, name)[mine], getattr(memory.history, name)[theirs]
                )
            np.testing.assert_array_equal(shard.steps.loss_mask[mine], memory.loss_mask[theirs])
            np.testing.assert_array_equal(shard.steps.value_targets[mine], memory.value_targets[theirs])
            shard_lam[mine], memory_rows[mine] = lam[theirs], theirs
            compared += len(mine)
        # the model inputs: the same history rule at the same lambda and targets, the same bits
        batch = shard.steps.batch(shard_lam, initial_rtg, initial_ctg, 8)
        for got, want in zip(batch.inputs, memory_batch.inputs, strict=True):
            np.testing.assert_array_equal(got.numpy(), want.numpy()[memory_rows])
    assert compared == len(windows)


def test_shards_partition_the_users_deterministically(log_directory: Path, tmp_path: Path) -> None:
    first = build(log_directory, tmp_path / "a")
    again = build(log_directory, tmp_path / "b")
    assert [f["sha256"] for f in first["files"]] == [f["sha256"] for f in again["files"]]
    assert read_manifest(tmp_path / "a") == first
    seen: list[str] = []
    for k, entry in enumerate(first["files"]):
        user_ids = load_shard(tmp_path / "a" / entry["file"]).user_ids.tolist()
        assert entry["users"] == len(user_ids) and user_ids == sorted(user_ids)
        assert all(shard_of(u, SHARDS) == k for u in user_ids)
        seen += user_ids
    assert len(seen) == len(set(seen)) == first["users"]
    assert sum(1 for f in first["files"] if f["users"]) > 1
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"] == SHARDS


@pytest.mark.parametrize(
    "column, value",
    [("cost", -1.0), ("reward", float("nan")), ("t", 2.5)],
)
def test_bad_rows_are_named_as_the_in_memory_loader_names_them(
    log_directory: Path, tmp_path: Path, column: str, value: float
) -> None:
    table = pq.ParquetDataset(log_directory).read()
    row = 700  # in the log's second batch of 97 rows and its third file
    values = table.column(column).to_numpy().astype(np.float64)
    values[row] = value
    table = table.set_column(table.column_names.index(column), column, pa.array(values))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table.slice(0, 400), bad / "part-0.parquet")
    pq.write_table(table.slice(400), bad / "part-1.parquet")
    with pytest.raises(LogValidationError) as in_memory:
        load_logs(bad)
    with pytest.raises(LogValidationError) as out_of_core:
        build(bad, tmp_path / "w")
    assert str(out_of_core.value) == str(in_memory.value)
    assert f"row {row + 1}" in str(in_memory.value) and repr(column) in str(in_memory.value)


def test_a_repeated_step_is_named_as_the_in_memory_loader_names_it(log_directory: Path, tmp_path: Path) -> None:
    table = pq.ParquetDataset(log_directory).read()
    repeated = table.slice(10, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.concat_tables([table, repeated]), bad / "part-0.parquet")
    with pytest.raises(LogValidationError) as in_memory:
        load_logs(bad)
    with pytest.raises(LogValidationError) as out_of_core:
        build(bad, tmp_path / "w")
    assert str(out_of_core.value) == str(in_memory.value)
    assert f"repeats at row {table.num_rows + 1}" in str(in_memory.value)


def test_a_log_larger_than_the_memory_limit_spills_and_gives_the_same_windows(tmp_path: Path) -> None:
    table = simulate_logs(WorldConfig(users=20_000, rounds=10, seed=4))
    logs = write_log_directory(table, tmp_path / "logs", files=2)
    spilled = build_windows(logs, tmp_path / "small", CONTEXT, SHARDS, "32MB", tmp_path / "spill", 50_000, threads=1)
    in_memory = build_windows(logs, tmp_path / "large", CONTEXT, SHARDS, "4GB", tmp_path / "spill", 50_000, threads=1)
    assert spilled["spilled_bytes"] > 0 and in_memory["spilled_bytes"] == 0
    assert spilled["files"] == in_memory["files"]  # the same shard files, byte for byte


# ---- the Spark engine: Spark's local mode, one session for the module ------------------------------------


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    if shutil.which("java") is None:
        pytest.skip("Spark's local mode needs a Java runtime (17+) on PATH")
    from pyspark.sql import SparkSession

    warnings.filterwarnings("ignore", category=FutureWarning, module="pyspark")  # its pandas version notice
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("saco tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.local.dir", str(tmp_path_factory.mktemp("spark")))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def build_on_spark(spark: SparkSession, logs: Path, out: Path) -> dict[str, Any]:
    return build_windows(logs, out, CONTEXT, shards=SHARDS, batch_rows=97, engine="spark", spark=spark)


def test_spark_writes_the_windows_the_out_of_core_path_writes(
    log_directory: Path, tmp_path: Path, spark: SparkSession
) -> None:
    duckdb_manifest = build(log_directory, tmp_path / "duckdb")
    spark_manifest = build_on_spark(spark, log_directory, tmp_path / "spark")
    assert (duckdb_manifest["engine"], spark_manifest["engine"]) == ("duckdb", "spark")
    different = {k for k in duckdb_manifest if duckdb_manifest[k] != spark_manifest[k]}
    assert different == {"engine", "spilled_bytes"}  # the targets and scales too, to the bit
    for entry in duckdb_manifest["files"]:  # the same users in the same shard, the same arrays, byte for byte
        mine, theirs = tmp_path / "spark" / entry["file"], tmp_path / "duckdb" / entry["file"]
        assert mine.read_bytes() == theirs.read_bytes(), entry["file"]
    assert sum(1 for f in spark_manifest["files"] if f["users"]) > 1


def test_spark_names_the_first_bad_row_whichever_task_fails_first(
    log_directory: Path, tmp_path: Path, spark: SparkSession
) -> None:
    table = pq.ParquetDataset(log_directory).read()
    cost, reward = table.column("cost").to_numpy().copy(), table.column("reward").to_numpy().copy()
    cost[1000], reward[300] = -1.0, float("nan")  # in different files: two tasks refuse a row
    table = table.set_column(table.column_names.index("cost"), "cost", pa.array(cost))
    table = table.set_column(table.column_names.index("reward"), "reward", pa.array(reward))
    bad = tmp_path / "bad"
    bad.mkdir()
    for i, start in enumerate(range(0, table.num_rows, 400)):
        pq.write_table(table.slice(start, 400), bad / f"part-{i}.parquet")
    with pytest.raises(LogValidationError) as out_of_core:
        build(bad, tmp_path / "w")
    with pytest.raises(LogValidationError) as on_spark:
        build_on_spark(spark, bad, tmp_path / "s")
    assert str(on_spark.value) == str(out_of_core.value)
    assert str(on_spark.value).startswith("column 'reward' has a missing or non-finite value (nan) at row 301")


def test_spark_names_a_repeated_step(log_directory: Path, tmp_path: Path, spark: SparkSession) -> None:
    table = pq.ParquetDataset(log_directory).read()
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.concat_tables([table, table.slice(10, 1)]), bad / "part-0.parquet")
    with pytest.raises(LogValidationError) as out_of_core:
        build(bad, tmp_path / "w")
    with pytest.raises(LogValidationError) as on_spark:
        build_on_spark(spark, bad, tmp_path / "s")
    assert str(on_spark.value) == str(out_of_core.value)
