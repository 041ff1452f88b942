"""The log export: Parquet partitions from the campaigns' streams, at-least-once and idempotent, on a real
Redis (keys under a unique prefix), including an exporter killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import redis
from loop_logs import DAY_MS, world_entries, write_entries

from contract.keys import LOG_GROUP, Keys
from contract.log_entry import LogEntryError
from loop.logstream import export_logs

SACO = str(Path(sys.executable).with_name("saco"))


def _read(out: Path, kind: str) -> dict[str, list[object]]:
    return pads.dataset(str(out / kind), format="parquet", partitioning="hive").to_table().to_pydict()


def test_export_writes_partitions_in_the_agreed_columns(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    entries = world_entries(40, 3, seed=0, campaign="spring")
    write_entries(redis_url, redis_prefix, "spring", entries)
    write_entries(redis_url, redis_prefix, "autumn", world_entries(10, 2, seed=1, campaign="autumn"))
    out = tmp_path / "logs"
    summary = export_logs(redis_url, out, prefix=redis_prefix, batch_size=50)
    decisions, outcomes = _read(out, "decisions"), _read(out, "outcomes")
    assert summary.campaigns == 2 and summary.decisions == 40 * 3 + 10 * 2
    assert len(decisions["decision_id"]) == summary.decisions and len(outcomes["decision_id"]) == summary.outcomes
    assert sorted(set(decisions["campaign"])) == ["autumn", "spring"]
    dates = {p.name for p in (out / "decisions" / "campaign=spring").iterdir()}
    assert dates == {"date=2026-05-27", "date=2026-05-28", "date=2026-05-29"}

    # one decision, field by field against what was written
    first = next(e for e in entries if e.fields["kind"] == "decision")
    row = decisions["decision_id"].index(first.fields["decision_id"])
    features = np.frombuffer(first.fields["features"], dtype="<f4")  # type: ignore[arg-type]
    assert [decisions[f"f{j}"][row] for j in range(len(features))] == features.astype(np.float64).tolist()
    assert decisions["cost"][row] == int(first.fields["cost"]) / 100
    assert decisions["t"][row] == decisions["decided_at_ms"][row] == first.at_ms
    assert decisions["probability"][row] == float(first.fields["probability"])
    assert decisions["explored"][row] is False and decisions["holdout"][row] is False
    assert decisions["model_version"][row] == "v-logging"
    for name in ("user_id", "action", "lambda", "decided_at_ms"):
        assert name in decisions
    outcome = next(e for e in entries if e.fields["kind"] == "outcome")
    row = outcomes["decision_id"].index(outcome.fields["decision_id"])
    assert outcomes["reward"][row] == int(outcome.fields["reward"]) / 100
    assert outcomes["outcome_at_ms"][row] == outcome.at_ms
    assert outcomes["t"][row] == outcomes["decided_at_ms"][row] == int(outcome.fields["decided_at_ms"])

    # nothing new: nothing written; new entries: only they are written
    files = sorted(p.name for p in out.rglob("*.parquet"))
    assert export_logs(redis_url, out, prefix=redis_prefix).entries == 0
    assert sorted(p.name for p in out.rglob("*.parquet")) == files
    later = world_entries(5, 1, seed=2, campaign="spring2", start_ms=entries[-1].at_ms + DAY_MS)
    write_entries(redis_url, redis_prefix, "spring", later)
    again = export_logs(redis_url, out, prefix=redis_prefix)
    assert again.entries == len(later) and again.redelivered == 0
    assert len(_read(out, "decisions")["decision_id"]) == summary.decisions + 5


def test_entries_read_and_not_acknowledged_are_exported_first(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    entries = world_entries(30, 2, seed=3)
    write_entries(redis_url, redis_prefix, "c1", entries)
    client = redis.Redis.from_url(redis_url)
    key = Keys(redis_prefix).log_key("c1")
    client.xgroup_create(key, LOG_GROUP, id="0")
    client.xreadgroup(LOG_GROUP, "exporter", {key: ">"}, count=25)  # an exporter that died before its write
    summary = export_logs(redis_url, tmp_path, prefix=redis_prefix, batch_size=25)
    assert summary.redelivered == 25 and summary.entries == len(entries)
    ids = _read(tmp_path, "decisions")["decision_id"]
    assert len(ids) == len(set(ids)) == 60
    assert client.xpending(key, LOG_GROUP)["pending"] == 0
    client.close()


def test_a_malformed_entry_is_refused_naming_it_and_nothing_is_written_or_acknowledged(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    entries = world_entries(3, 1, seed=4)
    bad = dict(entries[0].fields)
    bad["probability"] = "often"
    write_entries(redis_url, redis_prefix, "c1", entries[:1])
    client = redis.Redis.from_url(redis_url)
    key = Keys(redis_prefix).log_key("c1")
    bad_id = client.xadd(key, bad).decode()  # type: ignore[arg-type, union-attr]
    with pytest.raises(LogEntryError, match=f"entry {bad_id}: field 'probability' must be a number"):
        export_logs(redis_url, tmp_path, prefix=redis_prefix)
    assert not list(tmp_path.rglob("*.parquet"))
    assert client.xpending(key, LOG_GROUP)["pending"] == 2
    client.close()


def test_an_exporter_killed_mid_run_loses_and_duplicates_nothing(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    entries = world_entries(2000, 4, seed=5)
    write_entries(redis_url, redis_prefix, "c1", entries)
    decision_ids = {e.fields["decision_id"] for e in entries if e.fields["kind"] == "decision"}
    out = tmp_path / "logs"
    cmd = [SACO, "export", "--redis-url", redis_url, "--prefix", redis_prefix, "--out", str(out), "--batch-size", "40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.rglob("part-*.parquet"))) < 6:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client = redis.Redis.from_url(redis_url)
    groups = client.xinfo_groups(Keys(redis_prefix).log_key("c1"))
    assert groups[0]["lag"] > 0, "the exporter finished before it was killed: the test proves nothing"
    client.close()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["entries"] > 0
    assert not list(out.rglob(".tmp-*"))
    decisions, outcomes = _read(out, "decisions"), _read(out, "outcomes")
    assert len(decisions["decision_id"]) == len(set(decisions["decision_id"])) == len(decision_ids)
    assert set(decisions["decision_id"]) == decision_ids
    expected_outcomes = sum(1 for e in entries if e.fields["kind"] == "outcome")
    assert len(outcomes["decision_id"]) == len(set(outcomes["decision_id"])) == expected_outcomes
