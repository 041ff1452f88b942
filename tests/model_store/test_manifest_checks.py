"""The manifest is covered by the version's SHA256SUMS and validated field by field."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tiny_artifact import MANIFEST, published

from model_store import ArtifactError, Manifest, ModelStore
from model_store.versions import CHECKSUMS_FILE


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return published(tmp_path)


def test_checksums_cover_model_and_manifest(store: ModelStore) -> None:
    directory = store.versions_dir / "v1"
    done = subprocess.run(["sha256sum", "-c", CHECKSUMS_FILE], cwd=directory, capture_output=True, text=True)
    assert done.returncode == 0 and "manifest.json: OK" in done.stdout and "model.pt: OK" in done.stdout


def test_an_edited_manifest_is_refused(store: ModelStore) -> None:
    path = store.versions_dir / "v1" / "manifest.json"
    data = json.loads(path.read_text())
    data["default_lambda"] = 0.25  # a valid value, but not the published one
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"manifest\.json checksum .* SHA256SUMS"):
        store.load("v1")


def test_a_version_without_checksums_is_refused(store: ModelStore) -> None:
    (store.versions_dir / "v1" / CHECKSUMS_FILE).unlink()
    with pytest.raises(ArtifactError, match="no SHA256SUMS"):
        store.load("v1")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("default_lambda", math.nan, "default_lambda must be a finite number"),
        ("default_lambda", math.inf, "default_lambda must be a finite number"),
        ("default_lambda", -1.0, "default_lambda must be a finite number within"),
        ("default_lambda", 1e308, "default_lambda must be a finite number within"),
        ("default_lambda", "0.5", "default_lambda must be a finite number"),
        ("initial_rtg", math.nan, "initial_rtg must be a finite number"),
        ("lambda_table", [{"lam": math.nan, "cost_per_user": 1.0, "revenue_per_user": 2.0}], r"lambda_table\[0\]\.lam"),
        ("lambda_table", [{"lam": 1.0, "cost_per_user": math.inf, "revenue_per_user": 2.0}], "cost_per_user"),
        ("lambda_table", "steep", "lambda_table must be a list"),
        ("action_costs", [1.0, math.nan], r"action_costs\[1\]"),
        ("cost_ratios", [1.1, 0.0], r"cost_ratios\[1\] must be a positive finite number"),
        ("cost_ratios", [math.inf], r"cost_ratios\[0\]"),
        ("cost_ratios", 1.2, "cost_ratios must be a list"),
        ("feature_dim", True, "feature_dim must be a positive integer"),
    ],
)
def test_manifest_fields_are_validated(field: str, value: Any, message: str) -> None:
    data = {**MANIFEST, "version": "v1", "created_at": "now", "model_sha256": "0" * 64, field: value}
    with pytest.raises(ValueError, match=message):
        Manifest.from_json(data)


def test_a_tampered_manifest_with_matching_checksums_is_still_validated(store: ModelStore) -> None:
    """Even a manifest whose SHA256SUMS was rewritten to match is refused when a field is out of bounds
    (NaN lambda: decisions would answer "lambda": null and issue nothing)."""
    directory = store.versions_dir / "v1"
    path = directory / "manifest.json"
    path.write_text(path.read_text().replace('"default_lambda": 0.5', '"default_lambda": NaN'))
    sums = (directory / CHECKSUMS_FILE).read_text().splitlines()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lines = [f"{digest}  manifest.json" if line.endswith("manifest.json") else line for line in sums]
    (directory / CHECKSUMS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError, match="default_lambda must be a finite number"):
        store.load("v1")
