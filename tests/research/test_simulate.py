from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import research.simulate as simulate
from offline.logs import ROW_GROUP_ROWS, load_logs, log_writer
from research.world import WorldConfig


def test_a_population_within_one_block_is_the_population_simulate_logs_draws() -> None:
    config = WorldConfig(users=30, rounds=3, seed=2)
    (only,) = simulate.simulate_blocks(config)
    assert only.equals(simulate.simulate_logs(config))


def test_blocks_of_users_stream_into_one_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulate, "BLOCK_USERS", 40)
    config = WorldConfig(users=100, rounds=3, seed=2)
    rounds: list[int] = []
    with log_writer(tmp_path / "logs.parquet") as write:
        for table in simulate.simulate_blocks(config, progress=rounds.append):
            assert table.num_rows <= 40 * 3
            write(table)
    assert simulate.blocks(config) == 3 and len(rounds) == 9
    logs = load_logs(tmp_path / "logs.parquet")
    assert logs.n_rows == 300 and logs.n_users == 100
    assert logs.user_ids.tolist() == [f"u{i}" for i in range(100)]  # users in order, every round of each
    assert (np.diff(logs.t.reshape(100, 3), axis=1) == 1).all()
    again = list(simulate.simulate_blocks(config))
    assert pa.concat_tables(again).equals(pq.read_table(tmp_path / "logs.parquet"))  # seeded: the same log
    first, second = (logs.features[logs.user == u] for u in (0, 40))  # blocks draw different users
    assert not np.allclose(first, second)


def test_a_parquet_log_is_written_in_row_groups(tmp_path: Path) -> None:
    table = simulate.simulate_logs(WorldConfig(users=ROW_GROUP_ROWS // 10 + 1, rounds=10, seed=0))
    with log_writer(tmp_path / "logs.parquet") as write:
        write(table)
    assert pq.ParquetFile(tmp_path / "logs.parquet").metadata.num_row_groups == 2


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    table = simulate.simulate_logs(WorldConfig(users=5, rounds=2, seed=0))
    with pytest.raises(RuntimeError), log_writer(tmp_path / "logs.csv") as write:
        write(table)
        raise RuntimeError("simulation failed")
    assert list(tmp_path.iterdir()) == []
