"""Calibrations are records beside a version, never edits of it: the version's files stay byte-identical, the
newest record is the active one and is applied to the manifest the store loads, a record that would not serve is
never written, and a record that does not belong to the version is refused."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from tiny_artifact import published

from model_store import ArtifactError, ModelStore
from model_store.calibrations import calibration_sort_key

TABLE = [{"lam": 0.7, "cost_per_user": 1.0, "revenue_per_user": 5.0}]


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return published(tmp_path, "r1")


def digests(directory: Path) -> dict[str, str]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_calibration_leaves_the_version_as_published_and_serves_its_values(store: ModelStore) -> None:
    before = digests(store.versions_dir)
    served = store.calibrate("v1", command="test", lam=0.7, budget=100.0, users=10, lambda_table=TABLE)
    assert digests(store.versions_dir) == before
    assert served.calibration is not None and served.calibration.budget == 100.0
    assert served.manifest.default_lambda == 0.7 and served.manifest.lambda_for_budget_per_user(2.0) == 0.7
    assert served.published.default_lambda == 0.5 and served.published.lambda_table == []
    loaded = store.load("v1")
    assert loaded.calibration == served.calibration and loaded.manifest == served.manifest
    record = json.loads((store.root / "calibrations" / "v1" / f"{served.calibration.id}.json").read_text())
    assert record["version"] == "v1" and record["lambda"] == 0.7 and record["command"] == "test"
    assert record["model_sha256"] == served.published.model_sha256 and record["created_at"].endswith("Z")


def test_the_newest_record_is_active_and_the_older_ones_stay(store: ModelStore) -> None:
    ids = [store.calibrate("v1", command="test", lam=lam).calibration.id for lam in (0.1, 0.2, 0.3)]  # type: ignore[union-attr]
    assert len(set(ids)) == 3 and sorted(ids, key=calibration_sort_key) == ids == store.calibrations.ids("v1")
    assert store.calibrations.active_id("v1") == ids[-1] and store.load("v1").manifest.default_lambda == 0.3
    assert store.load("r1").calibration is None and store.load("r1").manifest.default_lambda == 0.5
    assert [store.calibrations.read("v1", i).lam for i in ids] == [0.1, 0.2, 0.3]


def test_a_record_that_would_not_serve_is_never_written(store: ModelStore) -> None:
    for bad, match in (
        ({"lam": math.nan}, "default_lambda must be a finite number"),
        ({"lam": 0.1, "cost_ratios": [0.0]}, r"cost_ratios\[0\]"),
    ):
        with pytest.raises(ValueError, match=match):
            store.calibrate("v1", command="test", **bad)
    assert store.calibrations.ids("v1") == [] and store.load("v1").manifest.default_lambda == 0.5


def test_a_tampered_or_misplaced_record_makes_the_version_refused(store: ModelStore) -> None:
    calibration = store.calibrate("v1", command="test", lam=0.2).calibration
    assert calibration is not None
    path = store.root / "calibrations" / "v1" / f"{calibration.id}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "lambda": -1.0}))
    with pytest.raises(ArtifactError, match=r"version 'v1'.*default_lambda must be a finite number within"):
        store.load("v1")
    path.write_text(json.dumps({**record, "version": "r1"}))
    with pytest.raises(ArtifactError, match=r"names calibration .* of version 'r1'"):
        store.load("v1")
    path.write_text(json.dumps({**record, "model_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="made for another model file"):
        store.load("v1")
    path.write_text("{")
    with pytest.raises(ArtifactError, match="unreadable"):
        store.load("v1")


def test_pruning_a_version_takes_its_calibrations(store: ModelStore) -> None:
    store.calibrate("r1", command="test", lam=0.2)
    store.calibrate("v1", command="test", lam=0.3)
    assert store.prune(0) == ["r1"]
    assert not (store.root / "calibrations" / "r1").exists() and store.calibrations.ids("v1")
