"""`saco retrain --by-features`: a candidate that scores coupons and bundles by their features, trained on the
exported logs of catalog campaigns (bundles of several coupons logged as bundles), warm-started onto a table
that grew, gated on the training table's rows; a run that would switch kinds fails with its reason."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from loop_logs import DAY_MS, catalog_entries, write_entries

from contract.catalog import ACTION_FEATURES, Catalog, Coupon, action_descriptors
from loop.actions import LOGS, training_table, with_rows
from loop.data import DelayConfig, joined_decisions, label_outcomes
from loop.gate import ModelChoices
from loop.retrain import RetrainConfig, model_kind, retrain_once
from model_store import ModelStore, load_scripted
from offline.logs import validate_table
from offline.train import TrainConfig

COUPONS = [
    {"action": 1, "value": 2.0},
    {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},
    {"action": 3, "value": 3.0, "min_spend": 25.0},
]
FIRST = Catalog.parse(COUPONS, bundles=[[1], [2], [3], [1, 3]])
LATER = Catalog.parse(COUPONS, bundles=[[1], [2], [3], [1, 3], [2, 3]])  # a bundle the first logs never held
SACO = str(Path(sys.executable).with_name("saco"))
FAST = TrainConfig(epochs=1, d_model=16, context_length=4)


def _model_state(store: ModelStore, version: str) -> dict[str, torch.Tensor]:
    state = load_scripted(store.load(version).model_path).state_dict()
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def test_a_retrain_by_features_learns_bundles_as_rows_and_warm_starts_onto_a_grown_table(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    entries = catalog_entries(500, 4, seed=31, catalog=FIRST)
    write_entries(redis_url, redis_prefix, "c1", entries)
    cfg = RetrainConfig(
        logs=tmp_path / "logs",
        store=tmp_path / "store",
        redis_url=redis_url,
        prefix=redis_prefix,
        train=FAST,
        now_ms=entries[-1].at_ms + DAY_MS,
        by_features=True,
    )
    first = retrain_once(cfg)
    assert first["decision"] == "promoted", first
    data = first["metrics"]["data"]
    assert data["by_features"] is True and data["num_actions"] == 4  # no coupon and coupons 1..3
    # no admin API: each coupon is described by its logs, an amount coupon of its largest reserved cost
    assert data["action_table"] == {
        "rows": 5,
        "num_actions": 4,
        "bundles": ["1+3"],
        "coupons_described_by": {"1": LOGS, "2": LOGS, "3": LOGS},
    }
    store = ModelStore(cfg.store)
    incumbent = store.load(first["candidate"])
    assert incumbent.manifest.action_features == list(ACTION_FEATURES) and incumbent.manifest.num_actions == 4
    logged = [Coupon(1, 200), Coupon(2, 500), Coupon(3, 300)]
    expected = action_descriptors(logged, [(1,), (2,), (3,), (1, 3)])
    first_state = _model_state(store, incumbent.version)
    np.testing.assert_allclose(first_state["action_table"].numpy(), expected)

    # the logged bundle decisions are rows K + j of the training table; single coupons their own rows
    joined, _ = joined_decisions(cfg.logs)
    rows = with_rows(joined, training_table(joined, 4)).column("action").to_numpy()
    coupons = joined.column("coupons").to_pylist()
    assert {tuple(c) for c, r in zip(coupons, rows, strict=True) if r == 4} == {(1, 3)}
    assert all(r == (c[0] if len(c) == 1 else 0) for c, r in zip(coupons, rows, strict=True) if len(c) < 2)
    assert (rows == 4).sum() > 100

    # a later campaign logs a new bundle (2+3): the table grows by a row; a warm start keeps the incumbent's
    # weights (a learning rate of ~0) and the scale its weights read the columns at
    later = catalog_entries(500, 4, seed=32, catalog=LATER, campaign="c2", start_ms=entries[-1].at_ms + DAY_MS)
    write_entries(redis_url, redis_prefix, "c2", later)
    second_cfg = dataclasses.replace(
        cfg,
        now_ms=later[-1].at_ms + DAY_MS,
        by_features=None,  # the incumbent's kind
        warm_start=True,
        train=dataclasses.replace(FAST, lr=1e-12),
    )
    second = retrain_once(second_cfg)
    assert second["decision"] in ("promoted", "refused"), second
    assert second["reasons"] and "gate" in second["metrics"], second
    assert second["metrics"]["data"]["by_features"] is True
    assert second["metrics"]["data"]["action_table"]["bundles"] == ["1+3", "2+3"]
    state = _model_state(store, second["candidate"])
    grown = action_descriptors(logged, [(1,), (2,), (3,), (1, 3), (2, 3)])
    np.testing.assert_allclose(state["action_table"].numpy(), grown)
    torch.testing.assert_close(state["action_scale"], first_state["action_scale"])
    assert not torch.allclose(state["action_scale"], torch.from_numpy(np.abs(grown).max(0)).clamp(min=1.0))
    weights = [k for k in first_state if k not in ("action_table", "action_scale")]
    assert all(torch.allclose(state[k], first_state[k], atol=1e-6) for k in weights)

    # the gate's choices are rows of the training table: a logged bundle is compared with bundles it picks
    candidate = store.load(second["candidate"])
    joined, _ = joined_decisions(second_cfg.logs)
    table = training_table(joined, 4)
    labelled, _ = label_outcomes(with_rows(joined, table), second_cfg.now_ms or 0, DelayConfig(method="naive"))
    logs = validate_table(labelled)
    chosen = ModelChoices(candidate, logs, table=table.table)(np.zeros(logs.n_rows))
    assert chosen.max() < table.rows and (chosen >= 4).any()

    # a run that would switch kinds fails with its reason; the incumbent stays current
    current = store.current_version()
    cmd = [SACO, "retrain", "--logs", str(cfg.logs), "--store", str(cfg.store), "--no-export", "--by-index"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    switched = json.loads(proc.stdout.strip().splitlines()[-1])
    assert switched["decision"] == "failed" and switched["failed_step"] == "data"
    assert switched["inputs"]["by_features"] is False
    assert "would switch kinds" in switched["reasons"][-1] and "new deployment" in switched["reasons"][-1]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: retrain: data failed: ValueError: the incumbent")
    assert store.current_version() == current


def test_an_index_incumbent_refuses_a_candidate_by_features(model_store_dir: Path) -> None:
    incumbent = ModelStore(model_store_dir).load()
    assert model_kind(None, incumbent) is False and model_kind(False, incumbent) is False
    assert model_kind(None, None) is False and model_kind(True, None) is True
    with pytest.raises(ValueError, match=r"scores coupons by index \(--by-index\): a candidate by features"):
        model_kind(True, incumbent)


def test_coupons_are_described_by_the_first_campaign_whose_catalog_has_them(tmp_path: Path) -> None:
    import pyarrow as pa

    decisions = pa.table(
        {
            "coupons": pa.array([[], [1], [1, 4], [4]], pa.list_(pa.int64())),
            "coupon_costs": pa.array([[], [2.0], [2.0, 7.5], []], pa.list_(pa.float64())),
            "face_cost": [0.0, 2.0, 9.5, 7.0],
            "action": [0, 1, 1_000_004, 4],
        }
    )
    catalogs = {
        "b": Catalog.parse([{"action": 1, "value": 3.0}]),
        "a": Catalog.parse([{"action": 1, "kind": "percent", "value": 20.0, "cap": 6.0}, {"action": 2, "value": 1.0}]),
    }
    table = training_table(decisions, 6, catalogs)
    assert table.described_by == {1: "a", 2: "a", 4: LOGS}  # coupon 4: no catalog has it; its largest cost
    assert table.several == ((1, 4),)
    assert table.table.shape == (7, len(ACTION_FEATURES))
    described = [catalogs["a"].coupons[0], catalogs["a"].coupons[1], Coupon(4, 750)]
    np.testing.assert_allclose(table.table, action_descriptors(described, [(1,), (2,), (), (4,), (), (1, 4)]))
    assert with_rows(decisions, table).column("action").to_pylist() == [0, 1, 6, 4]
    two = [{"action": 1, "value": 2.0}, {"action": 4, "value": 7.5}]
    assert table.offered(Catalog.parse(two)).tolist() == [True, True, False, False, True, False, False]
    assert table.offered(Catalog.parse(two, [[4], [1, 4]])).tolist() == [True, False, False, False, True, False, True]
    with pytest.raises(ValueError, match="the logs hold coupon 4, beyond the model's 4 actions"):
        training_table(decisions, 4, catalogs)
