"""The learning loop's run: export -> candidate -> gate -> publish, on a real Redis and a real model store.
A deliberately worse candidate is refused with its reasons and the incumbent stays current; a better one
is promoted and announced on the models channel."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from loop_logs import DAY_MS, world_entries, write_entries

from contract.keys import Keys
from loop.gate import GateConfig
from loop.retrain import RetrainConfig, next_run_in, remaining_decisions, retrain_once, run_scheduler
from model_store import ModelStore
from offline.logs import Logs
from offline.train import TrainConfig, TrainResult, train

SACO = str(Path(sys.executable).with_name("saco"))
FAST = TrainConfig(epochs=3)


def _worse(logs: Logs) -> TrainResult:
    """A model that learned revenue upside down: it prefers the coupons that earn least."""
    return train(dataclasses.replace(logs, reward=-logs.reward), FAST, progress=False)


def _good(logs: Logs) -> TrainResult:
    return train(logs, FAST, progress=False)


@pytest.fixture
def logged(redis_url: str, redis_prefix: str) -> int:
    """Logs of 2500 users x 5 rounds under uniform random logging; returns a `now` when all have matured."""
    entries = world_entries(2500, 5, seed=11)
    write_entries(redis_url, redis_prefix, "c1", entries)
    return entries[-1].at_ms + 8 * DAY_MS


def _config(tmp_path: Path, redis_url: str, prefix: str, now_ms: int) -> RetrainConfig:
    return RetrainConfig(
        logs=tmp_path / "logs", store=tmp_path / "store", redis_url=redis_url, prefix=prefix, train=FAST, now_ms=now_ms
    )


def test_a_worse_candidate_is_refused_with_its_reasons_and_the_incumbent_stays_current(
    redis_url: str, redis_prefix: str, logged: int, tmp_path: Path
) -> None:
    cmd = [SACO, "retrain", "--logs", str(tmp_path / "logs"), "--store", str(tmp_path / "store")]
    cmd += ["--redis-url", redis_url, "--prefix", redis_prefix, "--epochs", "3", "--maturity-days", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["decision"] == "promoted" and report["reasons"] == ["no incumbent: the first model is promoted"]
    assert report["metrics"]["export"]["decisions"] == 12500
    store = ModelStore(tmp_path / "store")
    incumbent = store.current_version()
    assert incumbent == report["candidate"]

    refused = retrain_once(_config(tmp_path, redis_url, redis_prefix, logged), trainer=_worse)
    assert refused["decision"] == "refused", refused
    assert any("off-policy lower bound" in r and "may be worse than the incumbent" in r for r in refused["reasons"])
    assert any("learned environment" in r and "below the incumbent" in r for r in refused["reasons"])
    gate = refused["metrics"]["gate"]["off_policy"]
    assert gate["candidate"]["value"] < gate["incumbent"]["value"]
    assert store.current_version() == incumbent == refused["current"]
    assert refused["candidate"] in store.list_versions()  # published, never current


def test_a_better_candidate_is_promoted_and_announced(
    redis_url: str, redis_prefix: str, logged: int, tmp_path: Path
) -> None:
    # at the worse incumbent's (small) spend the good candidate earns ~9% more, with a standard error of ~7% of
    # the value on 2,600 held-out decisions: a 10% tolerance, not the default 2%, is what that evidence certifies
    cfg = dataclasses.replace(_config(tmp_path, redis_url, redis_prefix, logged), gate=GateConfig(tolerance=0.1))
    assert retrain_once(cfg, trainer=_worse)["decision"] == "promoted"  # the first model: no incumbent
    store = ModelStore(cfg.store)
    incumbent = store.current_version()
    subscriber = redis.Redis.from_url(redis_url).pubsub()
    subscriber.subscribe(Keys(redis_prefix).models_channel)
    assert subscriber.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    calibration = store.calibrate(str(incumbent), command="test", lam=0.42).calibration
    assert calibration is not None
    published = {p: p.read_bytes() for p in store.versions_dir.rglob("*") if p.is_file()}

    report = retrain_once(cfg, trainer=_good)
    assert report["decision"] == "promoted", report
    # the candidate starts from the incumbent's lambda, in a calibration record of its own; no published file changed
    assert {p: p.read_bytes() for p in published} == published
    carried = store.load(report["candidate"]).calibration
    assert carried is not None and carried.lam == 0.42 and carried.command.startswith("saco retrain")
    assert carried.details == {"from_version": incumbent, "from_calibration": calibration.id}
    assert report["metrics"]["export"]["entries"] == 0  # nothing new was logged
    assert store.current_version() == report["candidate"] != incumbent
    point = report["metrics"]["gate"]["operating_point"]
    assert point["spend_matched"] and 0.99 <= point["spend_ratio"] <= 1.0
    assert report["metrics"]["gate"]["off_policy"]["candidate"]["ess"] >= 50
    assert store.history()[-1] == incumbent
    message = subscriber.get_message(timeout=2)
    assert message is not None and message["data"] == report["candidate"].encode()
    assert report["announced_to"] == 1
    subscriber.close()


def test_a_failed_run_reports_its_step_and_leaves_the_incumbent(tmp_path: Path, model_store_dir: Path) -> None:
    before = ModelStore(model_store_dir).current_version()
    cfg = RetrainConfig(logs=tmp_path / "nothing", store=model_store_dir, train=FAST)
    report = retrain_once(cfg)
    assert report["decision"] == "failed" and report["failed_step"] == "data"
    assert "no exported decisions" in report["reasons"][-1]
    assert ModelStore(model_store_dir).current_version() == before == report["current"]


def test_the_horizon_of_a_campaign() -> None:
    now = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
    assert remaining_decisions({"decisions": 300, "expected_decisions": 1000}, now) == 700
    ten_days = {"decisions": 100, "starts_at": "2026-05-31T12:00:00+00:00", "ends_at": "2026-06-03T12:00:00+00:00"}
    assert remaining_decisions(ten_days, now) == 200  # 100 a day, two days left
    assert remaining_decisions({"decisions": 5}, now) is None
    assert next_run_in(None, "0 3 * * *", now) == 15 * 3600
    with pytest.raises(ValueError, match="not a valid cron expression"):
        run_scheduler(RetrainConfig(logs=Path("x"), store=Path("y")), cron="every day", emit=print)


def test_the_scheduler_runs_on_its_interval_one_json_line_per_run(tmp_path: Path, model_store_dir: Path) -> None:
    started = time.monotonic()
    cmd = [SACO, "scheduler", "--logs", str(tmp_path / "nothing"), "--store", str(model_store_dir)]
    done = subprocess.run([*cmd, "--every", "2", "--runs", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["decision"] for r in reports] == ["failed", "failed"]
    assert time.monotonic() - started >= 2


def test_a_run_killed_mid_training_leaves_the_incumbent_and_the_logs(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    entries = world_entries(600, 4, seed=12)
    write_entries(redis_url, redis_prefix, "c1", entries)
    store = ModelStore(model_store_dir)
    incumbent, versions = store.current_version(), store.list_versions()
    cmd = [SACO, "retrain", "--logs", str(tmp_path / "logs"), "--store", str(model_store_dir)]
    cmd += ["--redis-url", redis_url, "--prefix", redis_prefix, "--maturity-days", "0"]
    proc = subprocess.Popen([*cmd, "--epochs", "200"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("training a candidate"):
            break
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.current_version() == incumbent and store.list_versions() == versions
    assert not [
        p for p in (model_store_dir / "versions").iterdir() if p.name not in versions and not p.name.startswith(".")
    ]

    done = subprocess.run([*cmd, "--epochs", "1"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["decision"] in ("promoted", "refused"), report
    assert report["metrics"]["data"]["decisions"] == 2400  # every logged decision, once
    for version in store.list_versions():
        store.load(version)  # every visible version is complete (checksum verified)
