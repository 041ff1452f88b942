from pathlib import Path

import pytest
import torch
from tiny_artifact import MANIFEST as TINY

from model_store import ArtifactError, ModelStore, load_scripted, save_scripted


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


MANIFEST = {k: v for k, v in TINY.items() if k != "default_lambda"}  # a model without a calibrated lambda


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    save_scripted(Double(), path)
    return path


def test_publish_load_promote_rollback(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.current_version() is None
    a = store.publish(model_file, MANIFEST, version="v1")
    assert store.current_version() == "v1" and a.manifest.model_sha256
    assert load_scripted(a.model_path)(torch.ones(1)).item() == 2.0
    store.publish(model_file, MANIFEST, version="v2")
    assert store.current_version() == "v2"
    store.publish(model_file, MANIFEST, version="v3", make_current=False)
    assert store.current_version() == "v2"
    assert store.list_versions() == ["v1", "v2", "v3"]
    assert store.rollback() == "v1"
    store.promote("v3")
    assert store.current_version() == "v3"


def test_corrupt_artifact_is_refused_and_never_current(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(model_file, MANIFEST, version="v1")
    store.publish(model_file, MANIFEST, version="v2", make_current=False)
    with open(store.versions_dir / "v2" / "model.pt", "ab") as fh:
        fh.write(b"garbage")
    with pytest.raises(ArtifactError, match="checksum"):
        store.load("v2")
    with pytest.raises(ArtifactError, match="checksum"):
        store.promote("v2")
    assert store.current_version() == "v1"


def test_rollback_skips_corrupt_predecessor(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for v in ("v1", "v2", "v3"):
        store.publish(model_file, MANIFEST, version=v)
    (store.versions_dir / "v2" / "manifest.json").write_text("{not json")
    assert store.rollback() == "v1"


def test_failed_validation_leaves_no_version(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")

    def refuse(artifact):
        raise RuntimeError("smoke test failed")

    with pytest.raises(RuntimeError):
        store.publish(model_file, MANIFEST, version="v1", validate=refuse)
    assert store.list_versions() == [] and store.current_version() is None
    assert [p.name for p in store.versions_dir.iterdir()] == []


def test_incomplete_manifest_refused(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError, match="num_actions"):
        store.publish(model_file, {k: v for k, v in MANIFEST.items() if k != "num_actions"})
    with pytest.raises(ValueError, match="objective"):
        store.publish(model_file, {**MANIFEST, "objective": "magic"})
    with pytest.raises(ArtifactError, match="invalid version"):
        store.publish(model_file, MANIFEST, version="../evil")


def test_missing_version_and_empty_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="no current version"):
        store.load()
    with pytest.raises(ArtifactError, match="not in model store"):
        store.load("v9")
    with pytest.raises(ArtifactError, match="roll back"):
        store.rollback()


def test_prune_keeps_the_newest_never_current_versions_and_every_served_one(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(model_file, MANIFEST, version="v1")
    store.publish(model_file, MANIFEST, version="r1", make_current=False)
    store.publish(model_file, MANIFEST, version="v2")  # v1 becomes the predecessor
    for name in ("r2", "r3", "r4"):
        store.publish(model_file, MANIFEST, version=name, make_current=False)
    store.publish(model_file, MANIFEST, version="v3")  # v2 the predecessor, v1 further back in HISTORY
    store.publish(model_file, MANIFEST, version="r5", make_current=False)
    assert store.prune(2) == ["r1", "r2", "r3"]
    assert store.list_versions() == ["v1", "v2", "r4", "v3", "r5"]
    assert not [p for p in store.versions_dir.iterdir() if p.name.startswith(".")]  # nothing half-deleted left
    assert store.prune(2) == []
    assert store.prune(0) == ["r4", "r5"]
    assert store.list_versions() == ["v1", "v2", "v3"]  # current and every version that was current stay
    assert store.rollback() == "v2" and store.rollback() == "v1"
    with pytest.raises(ValueError, match=">= 0"):
        store.prune(-1)


def test_a_hidden_directory_is_never_listed_as_a_version(tmp_path: Path, model_file: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(model_file, MANIFEST, version="v1")
    hidden = store.versions_dir / ".deleting-v0-x"
    hidden.mkdir()
    (hidden / "manifest.json").write_text("{}")
    assert store.list_versions() == ["v1"] and store.prune(0) == []
