from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from offline.logs import LogValidationError, load_logs, logs_table, validate_table, write_logs

GOOD = "user_id,t,action,cost,reward,f0,f1\nu1,0,1,2.0,10.0,0.1,0.2\nu1,1,0,0.0,0.0,0.3,0.4\nu2,5,2,5.0,0.0,0.5,0.6\n"


def write(tmp_path: Path, text: str, name: str = "logs.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_csv_loads_sorted_with_dense_users(tmp_path: Path) -> None:
    text = "user_id,t,action,cost,reward,f1,f0,extra\nb,2,0,0,1,1,2,x\na,0,1,2,3,3,4,y\nb,1,3,5,0,5,6,z\n"
    logs = load_logs(write(tmp_path, text))
    assert logs.feature_names == ("f0", "f1")
    assert list(logs.user_ids) == ["b", "a"]  # order of first appearance
    assert list(logs.t) == [1, 2, 0]  # user b sorted by t, then a
    assert logs.features[0].tolist() == [6.0, 5.0]  # f0 first, whatever the column order
    assert logs.num_actions == 4


def test_parquet_round_trip_and_directory(tmp_path: Path) -> None:
    table = logs_table(
        np.array(["u1", "u1"]),
        np.array([0, 1]),
        np.array([1, 0]),
        np.array([2.0, 0.0]),
        np.array([5.0, 1.0]),
        np.zeros((2, 3), dtype=np.float32),
    )
    write_logs(table, tmp_path / "d" / "part-0.parquet")
    assert load_logs(tmp_path / "d").n_rows == 2
    assert load_logs(tmp_path / "d" / "part-0.parquet").feature_dim == 3


@pytest.mark.parametrize(
    ("text", "column", "row"),
    [
        ("user_id,t,action,reward,f0\nu1,0,1,1.0,0.1\n", "cost", None),
        ("user_id,t,action,cost,reward,f0\nu1,0,1,1.0,2.0,nan\n", "f0", 1),
        ("user_id,t,action,cost,reward,f0\nu1,0,1,1.0,2.0,0.1\nu2,0,1,1.0,inf,0.1\n", "reward", 2),
        ("user_id,t,action,cost,reward,f0\nu1,0,1,1.0,2.0,0.1\nu1,1,1,-1.0,2.0,0.1\n", "cost", 2),
        ("user_id,t,action,cost,reward,f0\nu1,0,1.5,1.0,2.0,0.1\n", "action", 1),
        ("user_id,t,action,cost,reward,f0\nu1,0,-1,1.0,2.0,0.1\n", "action", 1),
        ("user_id,t,action,cost,reward,f0\nu1,0,1,1.0,2.0,0.1\nu1,x,1,1.0,2.0,0.1\n", "t", 2),
        ("user_id,t,action,cost,reward,f0\nu1,3,1,1.0,2.0,0.1\nu1,3,0,0.0,2.0,0.1\n", "t", 2),
        ("user_id,t,action,cost,reward,f0\nu1,0.5,1,1.0,2.0,0.1\n", "t", 1),
        ("user_id,t,action,cost,reward\nu1,0,1,1.0,2.0\n", "f0", None),
        ("user_id,t,action,cost,reward,f0,f2\nu1,0,1,1.0,2.0,0.1,0.2\n", "f1", None),
        ("user_id,t,action,cost,reward,f0\n,0,1,1.0,2.0,0.1\n", "user_id", 1),
    ],
)
def test_bad_logs_are_refused_naming_column_and_row(tmp_path: Path, text: str, column: str, row: int | None) -> None:
    with pytest.raises(LogValidationError) as err:
        load_logs(write(tmp_path, text))
    message = str(err.value)
    assert repr(column) in message or column in message
    if row is not None:
        assert f"row {row}" in message


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(LogValidationError, match="not found"):
        load_logs(tmp_path / "nope.csv")
    with pytest.raises(LogValidationError, match="unsupported"):
        load_logs(write(tmp_path, GOOD, "logs.json"))


def test_empty_table_refused() -> None:
    table = pa.table({k: pa.array([], pa.float64()) for k in ("t", "action", "cost", "reward", "f0")}).append_column(
        "user_id", pa.array([], pa.string())
    )
    with pytest.raises(LogValidationError, match="no rows"):
        validate_table(table)


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_logs(pa.table({"a": [1]}), tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_a_subset_of_users_keeps_their_rows_in_order_repeats_included() -> None:
    n = np.array([3, 1, 4, 2])  # users of different lengths
    user = np.repeat(np.arange(4), n)
    t = np.concatenate([np.arange(k) for k in n])
    table = logs_table(np.char.add("u", user.astype(str)), t, t % 2, 0.0 * t, 1.0 * t, np.stack([user, t], axis=1))
    logs = validate_table(table)
    part = logs.subset_users(np.array([2, 0, 2]))
    assert part.user.tolist() == [0] * 4 + [1] * 3 + [2] * 4 and part.user_ids.tolist() == ["u2", "u0", "u2"]
    assert part.features[:, 0].tolist() == [2] * 4 + [0] * 3 + [2] * 4
    assert part.t.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]
    assert logs.subset_users(np.zeros(0, np.int64)).n_rows == 0


def test_a_row_subset_keeps_its_users_in_order_and_drops_the_empty_ones() -> None:
    users = np.array(["a", "a", "a", "b", "b", "c"])
    logs = validate_table(
        logs_table(users, np.array([0, 1, 2, 0, 1, 0]), np.arange(6) % 2, np.zeros(6), np.arange(6.0), np.ones((6, 1)))
    )
    sub = logs.subset_rows(np.array([True, True, False, False, False, True]))  # a's first two rows, c's
    assert list(sub.user_ids) == ["a", "c"] and list(sub.user) == [0, 0, 1]
    assert list(sub.t) == [0, 1, 0] and list(sub.reward) == [0.0, 1.0, 5.0]
    with pytest.raises(ValueError, match="6 rows"):
        logs.subset_rows(np.ones(5, dtype=bool))
