"""A versioned, checksummed directory of exported policies with an atomic `CURRENT` pointer.

Layout::

    <root>/versions/<version>/model.pt        the TorchScript policy
    <root>/versions/<version>/manifest.json   see `Manifest`
    <root>/versions/<version>/SHA256SUMS      sha256 of model.pt and manifest.json (`sha256sum -c` reads it)
    <root>/CURRENT                            the serving version (one line)
    <root>/HISTORY                            versions that were current, oldest first (for rollback)
    <root>/calibrations/<version>/<id>.json   the version's calibrations (`model_store.calibrations`)

A published version's files never change: a calibration is a record of its own, and the version's newest
record is applied to the manifest it serves (`Artifact.manifest`; `Artifact.published` is the file's).

Versions that were never current (refused candidates) are kept to a number by `prune`; versions that are
or were current are never deleted by it.

Every write goes to a temporary file in the same directory, is fsynced, then renamed, so a reader sees
either the old file or the new one. A version directory is published by renaming a complete staging
directory, so a half-written version is never visible. Loading verifies both files against SHA256SUMS
(and the model file against the manifest's model_sha256): a changed manifest is refused like a changed
model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store.calibrations import Calibration, CalibrationRecords
from model_store.files import atomic_write_bytes, fsync_dir, sha256_file
from model_store.manifest import Manifest

MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
CHECKSUMS_FILE = "SHA256SUMS"
CHECKSUMMED = (MODEL_FILE, MANIFEST_FILE)
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(RuntimeError):
    """A version is missing, corrupt, or does not match what the caller expects."""


@dataclass(frozen=True)
class Artifact:
    """A loaded version. `manifest`: its manifest with the active calibration applied (what serves);
    `published`: the manifest file as published; `calibration`: the record applied (None: none yet)."""

    version: str
    path: Path
    manifest: Manifest
    published: Manifest
    calibration: Calibration | None = None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def write_checksums(directory: Path) -> None:
    """SHA256SUMS of a version directory, in the format of `sha256sum` (so `sha256sum -c SHA256SUMS` checks it)."""
    lines = "".join(f"{sha256_file(directory / name)}  {name}\n" for name in CHECKSUMMED)
    atomic_write_bytes(directory / CHECKSUMS_FILE, lines.encode())


def verify_checksums(directory: Path, version: str) -> None:
    """ArtifactError unless SHA256SUMS lists the model and the manifest and both match it."""
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        raise ArtifactError(f"version {version!r}: no {CHECKSUMS_FILE} (publish it with this release's model store)")
    listed: dict[str, str] = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name.lstrip("*")] = digest
    for name in CHECKSUMMED:
        if name not in listed:
            raise ArtifactError(f"version {version!r}: {CHECKSUMS_FILE} does not list {name}")
        actual = sha256_file(directory / name)
        if actual != listed[name]:
            raise ArtifactError(
                f"version {version!r}: {name} checksum {actual[:12]}… does not match {CHECKSUMS_FILE}'s "
                f"{listed[name][:12]}… (corrupt or tampered artifact)"
            )


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.calibrations = CalibrationRecords(self.root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    # ---- reading -------------------------------------------------------------------------------
    def list_versions(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [
            p
            for p in self.versions_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()  # not a staging copy
        ]
        return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]

    def current_version(self) -> str | None:
        pointer = self.root / "CURRENT"
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return version or None

    def history(self) -> list[str]:
        path = self.root / "HISTORY"
        return [v for v in path.read_text().split() if v] if path.is_file() else []

    def load(self, version: str | None = None) -> Artifact:
        """The named (default: current) version, with its checksums verified and its active calibration
        applied."""
        version = version or self.current_version()
        if version is None:
            raise ArtifactError(f"model store {self.root} has no current version (train one with `saco train`)")
        self._check_version_name(version)
        path = self.versions_dir / version
        if not (path / MANIFEST_FILE).is_file() or not (path / MODEL_FILE).is_file():
            raise ArtifactError(f"version {version!r} is not in model store {self.root}")
        verify_checksums(path, version)
        try:
            manifest = Manifest.from_json(json.loads((path / MANIFEST_FILE).read_text()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"version {version!r}: unreadable manifest: {exc}") from exc
        actual = sha256_file(path / MODEL_FILE)
        if actual != manifest.model_sha256:
            raise ArtifactError(
                f"version {version!r}: model file checksum {actual[:12]}… does not match the manifest's "
                f"{manifest.model_sha256[:12]}… (corrupt or tampered artifact)"
            )
        if manifest.version != version:
            raise ArtifactError(f"version {version!r}: manifest names version {manifest.version!r}")
        calibration = None
        try:
            active = self.calibrations.active_id(version)
            if active is not None:
                calibration = self.calibrations.read(version, active)
                if calibration.model_sha256 != manifest.model_sha256:
                    raise ValueError(f"calibration {active!r} was made for another model file")
                served = calibration.apply(manifest)
            else:
                served = manifest
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"version {version!r}: {exc}") from exc
        return Artifact(version=version, path=path, manifest=served, published=manifest, calibration=calibration)

    # ---- writing -------------------------------------------------------------------------------
    def new_version_name(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        existing = set(self.list_versions())
        n = 1
        while f"v{stamp}-{n}" in existing:
            n += 1
        return f"v{stamp}-{n}"

    def publish(
        self,
        model_file: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        version: str | None = None,
        make_current: bool = True,
        validate: Callable[[Artifact], object] | None = None,
    ) -> Artifact:
        """Copy `model_file` and its manifest into a new version, atomically.

        `manifest` is completed with version, created_at and model_sha256. `validate(artifact)`, if
        given, runs on the staged copy before it becomes visible (e.g. load it and run a forward);
        any exception it raises aborts the publish and leaves the store as it was.
        """
        version = version or self.new_version_name()
        self._check_version_name(version)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        final = self.versions_dir / version
        if final.exists():
            raise ArtifactError(f"version {version!r} already exists in {self.root}")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=self.versions_dir))
        try:
            shutil.copyfile(model_file, staging / MODEL_FILE)
            with open(staging / MODEL_FILE, "rb+") as fh:
                os.fsync(fh.fileno())
            full = dict(manifest)
            full.update(
                version=version,
                created_at=full.get("created_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                model_sha256=sha256_file(staging / MODEL_FILE),
            )
            manifest_obj = Manifest.from_json(full)  # refuses an incomplete manifest before publishing
            atomic_write_bytes(staging / MANIFEST_FILE, manifest_obj.to_json_bytes())
            write_checksums(staging)
            if validate is not None:
                validate(Artifact(version=version, path=staging, manifest=manifest_obj, published=manifest_obj))
            os.rename(staging, final)
            fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if make_current:
            self.promote(version)
        return self.load(version)

    def calibrate(self, version: str, *, command: str, lam: float, **fields: Any) -> Artifact:
        """Record a calibration of `version` (see `CalibrationRecords.record` for its fields): it becomes the
        version's active one. The version's own files are left as they are. Returns the version as it now
        serves."""
        artifact = self.load(version)
        self.calibrations.record(artifact.published, command=command, lam=lam, **fields)
        return self.load(version)

    def promote(self, version: str) -> None:
        """Make `version` current after verifying it loads (checksum, manifest)."""
        self.load(version)
        previous = self.current_version()
        if previous == version:
            return
        hist = self.history()
        if previous is not None:
            hist.append(previous)
        atomic_write_bytes(self.root / "HISTORY", ("\n".join(hist) + "\n").encode())
        atomic_write_bytes(self.root / "CURRENT", (version + "\n").encode())

    def rollback(self) -> str:
        """Make the previously current version current again; returns it."""
        hist = self.history()
        while hist:
            candidate = hist.pop()
            try:
                self.load(candidate)
            except ArtifactError:
                continue  # a corrupt predecessor is skipped, never made current
            atomic_write_bytes(self.root / "HISTORY", ("\n".join(hist) + "\n").encode())
            atomic_write_bytes(self.root / "CURRENT", (candidate + "\n").encode())
            return candidate
        raise ArtifactError(f"model store {self.root} has no earlier valid version to roll back to")

    def prune(self, keep: int) -> list[str]:
        """Retention of versions that were never current (refused or failed candidates, `--no-promote`
        trainings): keep the `keep` newest of them, delete the others; returns the deleted, oldest first.

        A version that is or was current (CURRENT, HISTORY) is never deleted: it is what a replica serves or
        may still serve until it reloads, and what `rollback` returns to. A deleted version is first renamed to
        a hidden name, so a reader sees it whole or not at all."""
        if keep < 0:
            raise ValueError(f"versions to keep must be >= 0, got {keep}")
        served = set(self.history())
        current = self.current_version()
        if current is not None:
            served.add(current)
        never = [v for v in self.list_versions() if v not in served]  # oldest first
        doomed = never[: max(len(never) - keep, 0)]
        for version in doomed:
            hidden = Path(tempfile.mkdtemp(prefix=f".deleting-{version}-", dir=self.versions_dir))
            os.rename(self.versions_dir / version, hidden / version)
            shutil.rmtree(hidden, ignore_errors=True)
            self.calibrations.remove(version)
        if doomed:
            fsync_dir(self.versions_dir)
        return doomed

    @staticmethod
    def _check_version_name(version: str) -> None:
        if not _VERSION_RE.match(version):
            raise ArtifactError(f"invalid version name {version!r}")
