"""Training rows from exported partitions (read as datasets, deduplicated, joined), and the delayed-outcome
treatments: the naive one biases predicted revenue and spend, the delay model does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loop_logs import DAY_MS, world_entries, write_entries

from loop.data import DelayConfig, joined_decisions, training_logs
from loop.logstream import export_logs
from research.delay_study import DelayStudy, run_delay_study

SACO = str(Path(sys.executable).with_name("saco"))


@pytest.fixture
def exported(redis_url: str, redis_prefix: str, tmp_path: Path) -> tuple[Path, list]:
    entries = world_entries(60, 4, seed=7, delay_mean_ms=2 * DAY_MS)
    write_entries(redis_url, redis_prefix, "c1", entries)
    out = tmp_path / "logs"
    export_logs(redis_url, out, prefix=redis_prefix, batch_size=70)
    return out, entries


def test_decisions_join_their_outcomes_once_each(exported: tuple[Path, list]) -> None:
    out, entries = exported
    # a duplicated partition (an exporter restarted with another batch size) changes nothing
    first = sorted((out / "outcomes").rglob("*.parquet"))[0]
    shutil.copy(first, first.with_name("part-copy.parquet"))
    table, counts = joined_decisions(out)
    assert counts == {
        "decisions": 240,
        "outcomes": sum(e.fields["kind"] == "outcome" for e in entries),
        "orphan_outcomes": 0,
    }
    rows = dict(zip(table.column("decision_id").to_pylist(), table.column("reward").to_pylist(), strict=True))
    for e in entries:
        if e.fields["kind"] == "outcome":
            assert rows[e.fields["decision_id"]] == int(e.fields["reward"]) / 100
    assert table.column("user_id").to_pylist()[0].startswith("c1/")
    logs, logged = training_logs(out, now_ms=entries[-1].at_ms + 1, delay=DelayConfig(method="naive"))
    assert logs.n_rows == 240 and logs.n_users == 60 and logs.feature_dim == 8
    # the labels are the outcomes, 0 without one
    assert logs.reward.sum() == pytest.approx(
        sum(int(e.fields["reward"]) / 100 for e in entries if e.fields["kind"] == "outcome")
    )
    # the table keeps the logging columns, row for row with the training logs
    assert logged.table.column("probability").to_numpy() == pytest.approx(0.25)
    np.testing.assert_array_equal(logged.table.column("action").to_numpy(), logs.action)


def test_the_maturity_window_drops_young_decisions_and_the_naive_treatment_keeps_them(
    exported: tuple[Path, list],
) -> None:
    out, entries = exported
    decided = np.array([e.at_ms for e in entries if e.fields["kind"] == "decision"])
    now = int(decided.max())
    mature, _ = training_logs(out, now_ms=now, delay=DelayConfig(method="maturity", maturity_ms=2 * DAY_MS))
    assert mature.n_rows == int((decided <= now - 2 * DAY_MS).sum()) < 240
    naive, _ = training_logs(out, now_ms=now, delay=DelayConfig(method="naive"))
    model, logged = training_logs(out, now_ms=now, delay=DelayConfig(method="delay-model"))
    assert naive.n_rows == model.n_rows == 240
    assert model.reward.sum() > naive.reward.sum()  # the pending decisions' expected outcomes
    assert logged.metrics["imputed_outcomes"] > 0


def test_saco_train_takes_the_export_directory(exported: tuple[Path, list], tmp_path: Path) -> None:
    out, _ = exported
    done = subprocess.run(
        [SACO, "train", "--logs", str(out), "--store", str(tmp_path / "store"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["version"]


def test_naive_labels_bias_predicted_revenue_and_spend_and_the_delay_model_does_not() -> None:
    result = run_delay_study(DelayStudy(users=1000, epochs=4, seed=0))
    methods = result["methods"]
    assert methods["naive"]["revenue_bias"] < -0.05 and methods["naive"]["spend_bias"] < -0.05
    assert abs(methods["delay-model"]["revenue_bias"]) < 0.03 and abs(methods["delay-model"]["spend_bias"]) < 0.03
