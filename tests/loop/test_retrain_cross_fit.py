"""The gate's evidence (`loop.retrain.EvidencePlan`): held-out users' decisions, and the decisions new to the
incumbent, each scored against a candidate that never trained on it (two candidates, each trained without one
half of the users' new decisions)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from loop_logs import DAY_MS, world_entries, write_entries

from loop.retrain import RetrainConfig, evidence_plan, half_of, is_eval_user, retrain_once, trained_until_ms
from model_store import ModelStore
from offline.logs import logs_table, validate_table
from offline.train import TrainConfig

FAST = TrainConfig(epochs=1)


def _logs(users: int, rounds: int, new_from: int) -> tuple[pa.Table, int]:
    """`users` returning users x `rounds` decisions a day apart; decisions from round `new_from` on are after
    the cutoff returned."""
    rng = np.random.default_rng(3)
    user = np.repeat(np.arange(users), rounds)
    t = np.tile(np.arange(rounds), users)
    decided = 1_000 * DAY_MS + t * DAY_MS + rng.integers(0, 1000, len(t))
    table = logs_table(
        np.char.add("c1/u", user.astype(str)),
        t,
        rng.integers(0, 3, len(t)),
        np.zeros(len(t)),
        rng.random(len(t)),
        rng.normal(size=(len(t), 2)).astype(np.float32),
        {"decided_at_ms": decided},
    )
    return table, 1_000 * DAY_MS + new_from * DAY_MS - 1


def test_no_decision_is_scored_against_a_candidate_that_trained_on_it() -> None:
    table, cutoff = _logs(2000, 5, new_from=3)
    logs = validate_table(table)
    plan = evidence_plan(logs, table, cutoff, eval_fraction=0.2)
    held = is_eval_user(logs.user_ids, 0.2)[logs.user]
    new = (logs.t >= 3) & ~held
    assert plan.cross_fit and np.array_equal(plan.held, held) and np.array_equal(plan.new, new)
    assert 0.17 < held.mean() < 0.23
    half = half_of(logs.user_ids)
    assert 0.45 < half.mean() < 0.55
    assert 0.15 < is_eval_user(logs.user_ids[half == 1], 0.2).mean() < 0.25  # the halves ignore who is held out
    first, second = plan.train_rows
    for k, train in enumerate(plan.train_rows):
        assert not (plan.evidence_rows(k) & train).any()  # never scored on what it trained on
        assert not (held & train).any()
        assert (train[~held & ~new]).all()  # every decision older than the incumbent trains both
    # every held-out decision and every new one is evidence, once
    assert np.array_equal(plan.evidence_rows(0) | plan.evidence_rows(1), held | new)
    assert not (plan.evidence_rows(0) & plan.evidence_rows(1)).any()
    assert plan.evidence_decisions == int((held | new).sum())
    # a half's new decisions train the other half's candidate
    row_half = half[logs.user]
    assert first[new & (row_half == 1)].all() and not first[new & (row_half == 0)].any()
    assert second[new & (row_half == 0)].all() and not second[new & (row_half == 1)].any()
    # each candidate's training logs keep every user's history a prefix of the trajectory
    for train in plan.train_rows:
        sub = logs.subset_rows(train)
        starts = sub.user_slices()
        assert all(np.array_equal(sub.t[a:b], np.arange(b - a)) for a, b in itertools.pairwise(starts))

    # without an incumbent (or with cross-fitting off) nothing is new: one candidate, the held-out users' evidence
    for alone in (evidence_plan(logs, table, None, 0.2), evidence_plan(logs, table, cutoff, 0.2, cross_fit=False)):
        assert not alone.cross_fit and len(alone.train_rows) == 1
        assert np.array_equal(alone.train_rows[0], ~held) and np.array_equal(alone.evidence_rows(0), held)


def test_a_second_run_gates_on_the_decisions_new_to_the_incumbent(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    old = world_entries(500, 4, seed=41)
    write_entries(redis_url, redis_prefix, "c1", old)
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=tmp_path / "store",
        redis_url=redis_url,
        prefix=redis_prefix,
        train=FAST,
        now_ms=old[-1].at_ms + DAY_MS,
        environment_check=False,
    )
    first = retrain_once(cfg)
    assert first["decision"] == "promoted", first
    store = ModelStore(cfg.store)
    incumbent = store.load(first["candidate"])
    last_old = max(e.at_ms for e in old if e.fields["kind"] == "decision")
    held_old = sum(is_eval_user(np.array([f"c1/u{u}" for u in range(500)]), 0.2)) * 4
    assert trained_until_ms(incumbent) <= last_old  # the newest decision of a training user
    assert first["metrics"]["data"]["train_decisions"] == [2000 - held_old]

    shutil.copytree(cfg.store, tmp_path / "store-2")  # the same incumbent, for a run without cross-fitting

    # a later campaign's traffic: new to the incumbent. --refit: once the two candidates pass (a tolerance of 100%
    # passes any), the one published and promoted is trained on both halves' decisions
    new = world_entries(400, 3, seed=42, campaign="c2", start_ms=last_old + DAY_MS)
    write_entries(redis_url, redis_prefix, "c2", new)
    lenient = dataclasses.replace(cfg.gate, tolerance=1.0, min_ess=1.0)
    second = retrain_once(dataclasses.replace(cfg, now_ms=new[-1].at_ms + DAY_MS, refit=True, gate=lenient))
    assert second["decision"] == "promoted", second
    data = second["metrics"]["data"]
    users = np.array([f"c2/u{u}" for u in range(400)])
    held_new = is_eval_user(users, 0.2)
    halves = half_of(users)[~held_new]
    assert data["cross_fit"] is True
    assert data["new_decisions"] == 3 * int((~held_new).sum())
    assert data["held_out_decisions"] == held_old + 3 * int(held_new.sum())
    # each candidate: every older decision of the training users, and the other half's new ones
    assert data["train_decisions"] == [
        2000 - held_old + 3 * int((halves == 1).sum()),
        2000 - held_old + 3 * int((halves == 0).sum()),
    ]
    assert (
        data["incumbent_trained_until"]
        == dt.datetime.fromtimestamp(trained_until_ms(incumbent) / 1000, dt.UTC).isoformat()
    )
    gate = second["metrics"]["gate"]
    assert gate["operating_point"]["decisions"] == data["held_out_decisions"] + data["new_decisions"]
    # the gated candidate (the first) trained on the second half's new decisions, the refit on both halves'
    gated = store.load(second["gated_candidate"]).manifest.metrics["trained_on"]
    assert gated["decisions"] == data["train_decisions"][0] and gated["until_ms"] > last_old
    assert second["gated_candidate"] != second["candidate"] == store.current_version()
    trained_on = store.load(second["candidate"]).manifest.metrics["trained_on"]
    assert trained_on["decisions"] == 2000 - held_old + data["new_decisions"]
    assert second["seconds_by_step"]["train"] > 0 and second["seconds_by_step"]["refit"] > 0

    alone = retrain_once(
        dataclasses.replace(cfg, store=tmp_path / "store-2", now_ms=new[-1].at_ms + DAY_MS, cross_fit=False)
    )
    assert alone["metrics"]["data"]["cross_fit"] is False
    assert alone["metrics"]["data"]["train_decisions"] == [2000 - held_old + data["new_decisions"]]
    assert alone["metrics"]["gate"]["operating_point"]["decisions"] == data["held_out_decisions"]


def test_a_model_saco_train_made_is_new_to_every_decision_after_its_creation(model_store_dir: Path) -> None:
    store = ModelStore(model_store_dir)
    version = store.current_version()
    assert version is not None
    artifact = store.load(version)
    assert "until_ms" not in (artifact.manifest.metrics.get("trained_on") or {})
    created = dt.datetime.fromisoformat(artifact.manifest.created_at)
    assert trained_until_ms(artifact) == int(created.timestamp() * 1000)
