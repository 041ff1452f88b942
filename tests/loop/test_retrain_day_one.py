"""`saco retrain` from the first day of traffic: young decisions are gated under the delay model's labels, a
failed run is one line on stderr naming its step and reason, every printed JSON is valid (no NaN), a candidate
takes its action space from the incumbent whatever was logged, and refused candidates are kept to a number."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loop_logs import Entry, world_entries, write_entries

from loop.data import DelayConfig
from loop.gate import GateConfig
from loop.retrain import RetrainConfig, retrain_once
from model_store import ModelStore
from offline.train import TrainConfig

SACO = str(Path(sys.executable).with_name("saco"))
HOUR_MS = 3_600_000


def strict_json(line: str) -> dict[str, Any]:
    """json.loads that refuses NaN and Infinity (Python's json reads them; JSON parsers do not)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not valid JSON: {constant}")

    return dict(json.loads(line, parse_constant=refuse))


def young_entries(users: int, rounds: int, seed: int, *, delay_mean_ms: float = 0.0) -> list[Entry]:
    """`rounds` hourly rounds that ended an hour ago: no decision is a day old."""
    now = int(time.time() * 1000)
    return world_entries(
        users, rounds, seed, start_ms=now - (rounds + 1) * HOUR_MS, round_ms=HOUR_MS, delay_mean_ms=delay_mean_ms
    )


def held_out_only(entries: list[Entry]) -> list[Entry]:
    """Every decision in the campaign's holdout group: no coupon, probability 1, as the service logs them."""
    out = []
    for e in entries:
        fields = dict(e.fields)
        if fields["kind"] == "decision":
            fields.update(action="0", cost="0", probability="1.0", holdout="1", explored="0")
        else:
            fields.update(action="0", cost="0")
        out.append(Entry(e.at_ms, fields))
    return out


def retrain(tmp_path: Path, store: Path, redis_url: str, prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [SACO, "retrain", "--logs", str(tmp_path / "logs"), "--store", str(store), "--redis-url", redis_url]
    return subprocess.run([*cmd, "--prefix", prefix, *extra], capture_output=True, text=True, timeout=600)


def test_young_traffic_is_gated_under_the_delay_models_labels(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    """Decisions at most 5 hours old, conversions arriving after a day on average: the default run (delay
    model, a 7-day maturity window that would leave nothing) trains and gates on every decision."""
    write_entries(redis_url, redis_prefix, "c1", young_entries(500, 4, seed=31, delay_mean_ms=24 * HOUR_MS))
    incumbent = ModelStore(model_store_dir).current_version()
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=model_store_dir,
        redis_url=redis_url,
        prefix=redis_prefix,
        train=TrainConfig(epochs=2),
    )
    report = retrain_once(cfg)
    assert report["decision"] in ("promoted", "refused"), report["reasons"]
    assert report["inputs"]["delay"] == {"method": "delay-model", "maturity_ms": 7 * 86_400_000, "em_iterations": 200}
    data, gate = report["metrics"]["data"], report["metrics"]["gate"]
    assert data["pending"] > 500 and data["imputed_outcomes"] > 10  # conversions still to come are expected
    trained_on = ModelStore(model_store_dir).load(report["candidate"]).manifest.metrics["trained_on"]["decisions"]
    assert gate["labelling"] == "delay-model" and gate["eval_decisions"] == data["decisions"] - trained_on > 200
    assert report["incumbent"] == incumbent and report["reasons"]


def test_a_failed_run_is_one_line_on_stderr_and_valid_json_on_stdout(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    write_entries(redis_url, redis_prefix, "c1", young_entries(200, 3, seed=32))
    versions = ModelStore(model_store_dir).list_versions()
    done = retrain(tmp_path, model_store_dir, redis_url, redis_prefix, "--delay-method", "maturity")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and "Traceback" not in done.stderr
    assert lines[-1].startswith("error: retrain: data failed: LogValidationError: no decision is older than the")
    assert "--delay-method delay-model" in lines[-1]
    report = strict_json(done.stdout.strip().splitlines()[-1])
    assert report["decision"] == "failed" and report["failed_step"] == "data"
    assert report["reasons"][-1] == lines[-1].removeprefix("error: retrain: ")
    assert "Traceback" in report["traceback"]
    assert ModelStore(model_store_dir).list_versions() == versions  # nothing published

    # the scheduler keeps running, with the same line for each failed run
    sched = [SACO, "scheduler", "--logs", str(tmp_path / "nothing"), "--store", str(model_store_dir)]
    done = subprocess.run([*sched, "--every", "1", "--runs", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line.split(": ", 2)[:2] for line in done.stderr.strip().splitlines()] == [["error", "scheduler"]] * 2
    assert [strict_json(line)["failed_step"] for line in done.stdout.strip().splitlines()] == ["data", "data"]


def test_held_out_only_traffic_keeps_the_incumbents_action_space_and_prints_null_for_no_evidence(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    """Every decision held out (no coupon, action 0 only): no decision can match a model's coupon, so the
    estimates have no value (null, not NaN) and the candidate is refused; it has the incumbent's 4 actions."""
    store = ModelStore(model_store_dir)
    incumbent = store.load()
    assert incumbent.manifest.num_actions == 4
    write_entries(redis_url, redis_prefix, "c1", held_out_only(young_entries(300, 4, seed=33)))
    done = retrain(tmp_path, model_store_dir, redis_url, redis_prefix, "--epochs", "2", "--maturity-days", "0")
    assert done.returncode == 0, done.stderr
    report = strict_json(done.stdout.strip().splitlines()[-1])
    assert report["decision"] == "refused", report["reasons"]
    assert report["metrics"]["data"]["num_actions"] == 4
    assert report["metrics"]["data"]["action_space_from"] == f"the incumbent {incumbent.version}"
    assert store.load(report["candidate"]).manifest.num_actions == 4
    off_policy = report["metrics"]["gate"]["off_policy"]
    assert off_policy["candidate"]["value"] is None and off_policy["candidate"]["matches"] == 0
    assert any(r.startswith("too little evidence") for r in report["reasons"])
    assert store.current_version() == incumbent.version


def test_few_logged_actions_keep_the_incumbents_action_space(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    """A campaign that offers coupon 1 only: actions 0 and 1 logged. The candidate still has 4 actions, and the
    learned environment scores both models among the logged ones."""
    entries = []
    for e in young_entries(400, 4, seed=34):
        fields = dict(e.fields)
        if int(fields["action"]) > 1:
            fields.update(action="1", cost="100" if fields["kind"] == "decision" else fields["cost"])
        entries.append(Entry(e.at_ms, fields))
    write_entries(redis_url, redis_prefix, "c1", entries)
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=model_store_dir,
        redis_url=redis_url,
        prefix=redis_prefix,
        train=TrainConfig(epochs=2),
        delay=DelayConfig(maturity_ms=0),
    )
    report = retrain_once(cfg)
    assert report["decision"] in ("promoted", "refused"), report["reasons"]
    assert ModelStore(model_store_dir).load(report["candidate"]).manifest.num_actions == 4
    assert set(report["metrics"]["gate"]["environment"]) == {"candidate", "incumbent"}


def test_refused_candidates_are_kept_to_a_number(
    redis_url: str, redis_prefix: str, model_store_dir: Path, tmp_path: Path
) -> None:
    write_entries(redis_url, redis_prefix, "c1", young_entries(150, 3, seed=35))
    store = ModelStore(model_store_dir)
    current = store.current_version()
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=model_store_dir,
        redis_url=redis_url,
        prefix=redis_prefix,
        train=TrainConfig(epochs=1),
        gate=GateConfig(min_ess=float("inf")),  # nothing is evidence enough: every candidate is refused
        environment_check=False,
        keep_refused=2,
    )
    candidates = []
    for _ in range(4):
        report = retrain_once(cfg)
        assert report["decision"] == "refused", report["reasons"]
        candidates.append(report["candidate"])
    assert report["pruned"] == [candidates[1]]
    assert store.list_versions() == [current, *candidates[2:]] and store.current_version() == current
    report = retrain_once(dataclasses.replace(cfg, keep_refused=0))
    assert report["pruned"] == [*candidates[2:], report["candidate"]]
    assert store.list_versions() == [current]
