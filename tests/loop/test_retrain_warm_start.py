"""`saco retrain --warm-start` and `--campaign`: a candidate that starts from the incumbent's weights, and a
run restricted to some campaigns' logs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from loop_logs import DAY_MS, world_entries, write_entries

from loop.retrain import RetrainConfig, incumbent_weights, retrain_once
from model_store import ModelStore, load_scripted
from offline.train import TrainConfig

FAST = TrainConfig(epochs=1)


def _model_state(store: ModelStore, version: str) -> dict[str, torch.Tensor]:
    state = load_scripted(store.load(version).model_path).state_dict()
    return {k: v for k, v in state.items() if k.startswith("model.")}


def test_a_warm_started_candidate_starts_from_the_incumbent_and_a_run_reads_only_its_campaigns(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    entries = world_entries(400, 4, seed=21)
    write_entries(redis_url, redis_prefix, "c1", entries)
    write_entries(redis_url, redis_prefix, "c2", world_entries(300, 4, seed=22, campaign="c2"))
    now = entries[-1].at_ms + 8 * DAY_MS
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=tmp_path / "store",
        redis_url=redis_url,
        prefix=redis_prefix,
        train=FAST,
        now_ms=now,
        campaigns=["c1"],
        environment_check=False,
    )
    first = retrain_once(dataclasses.replace(cfg, train=dataclasses.replace(FAST, seed=5)))  # other initial weights
    assert first["decision"] == "promoted", first
    assert first["metrics"]["export"]["decisions"] == 2800  # both campaigns exported ...
    assert first["metrics"]["data"]["decisions"] == 1600  # ... only c1 trained on
    store = ModelStore(cfg.store)
    incumbent = store.current_version()
    assert incumbent is not None

    # a learning rate of ~0: a warm-started candidate keeps the incumbent's weights (to 1e-6), a cold one does not
    frozen = dataclasses.replace(FAST, lr=1e-12)
    warm = retrain_once(dataclasses.replace(cfg, train=frozen, warm_start=True, gate=cfg.gate))
    cold = retrain_once(dataclasses.replace(cfg, train=frozen))
    assert warm["decision"] != "failed" and cold["decision"] != "failed", (warm, cold)
    before = _model_state(store, incumbent)
    after_warm, after_cold = _model_state(store, warm["candidate"]), _model_state(store, cold["candidate"])
    assert before.keys() == after_warm.keys()
    assert all(torch.allclose(before[k], after_warm[k], atol=1e-6) for k in before)
    assert not all(torch.allclose(before[k], after_cold[k], atol=1e-6) for k in before)
    assert warm["inputs"]["warm_start"] is True and warm["inputs"]["campaigns"] == ["c1"]

    with pytest.raises(ValueError, match="cannot warm start"):
        incumbent_weights(store.load(incumbent), dataclasses.replace(FAST, d_model=16))
