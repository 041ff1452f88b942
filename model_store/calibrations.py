"""Calibration records: what `saco calibrate` (or the learning loop) found for a published version, kept beside it
and never inside it, so that a published version's files never change.

Layout::

    <root>/calibrations/<version>/<id>.json   one record per calibration, written once, never rewritten

A record names the version (and the sha256 of its model) it was made for, the budget and users it was made
for, the lambda it found, the spend-vs-lambda table, the expected-cost ratios, when, and by what command. The
version's *active* calibration is its newest record (ids sort by creation time); the service applies it to the
manifest it serves (`Calibration.apply`). A version without records serves its manifest's own values.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from model_store.files import write_new_file
from model_store.manifest import LambdaPoint, Manifest

CALIBRATIONS_DIR = "calibrations"
_ID_RE = re.compile(r"^c(\d{8}T\d{6})-(\d+)$")


def calibration_sort_key(calibration_id: str) -> tuple[str, int]:
    """Creation order of ids `c<UTC stamp>-<n>` (n counts the records made within one second)."""
    match = _ID_RE.match(calibration_id)
    if match is None:
        raise ValueError(f"invalid calibration id {calibration_id!r}")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class Calibration:
    """One calibration of one version. `lam` becomes the served `default_lambda`; `lambda_table` and
    `cost_ratios` replace the manifest's (see `Manifest` for what each means)."""

    id: str
    version: str
    model_sha256: str
    created_at: str
    command: str  # what made it: the command line of `saco calibrate`, or the learning loop's step
    lam: float
    budget: float | None = None  # the budget B it was made for (None: carried over, not searched)
    users: int | None = None  # the users B covers
    lambda_table: list[LambdaPoint] = field(default_factory=list)
    cost_ratios: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # method, reservation, seed, predictions, fit metrics

    def __post_init__(self) -> None:
        table = self.lambda_table
        if not isinstance(table, list) or not all(isinstance(p, LambdaPoint | dict) for p in table):
            raise ValueError("calibration field lambda_table must be a list of {lam, cost_per_user, revenue_per_user}")
        points = [p if isinstance(p, LambdaPoint) else LambdaPoint(**p) for p in table]
        object.__setattr__(self, "lambda_table", points)  # frozen: normalised once, here

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest as served under this calibration (checked like a manifest: a bad value is refused)."""
        try:
            return replace(
                manifest,
                default_lambda=self.lam,
                lambda_table=list(self.lambda_table),
                cost_ratios=list(self.cost_ratios),
            )
        except ValueError as exc:
            raise ValueError(f"calibration {self.id!r}: {str(exc).removeprefix('manifest ')}") from None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lambda"] = data.pop("lam")
        return data

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if not isinstance(data, dict):
            raise ValueError("a calibration record must be a JSON object")
        missing = [n for n in ("id", "version", "model_sha256", "created_at", "command", "lambda") if n not in data]
        if missing:
            raise ValueError(f"calibration record lacks field(s): {', '.join(missing)}")
        known = {name for name in cls.__dataclass_fields__ if name != "lam"}
        return cls(lam=data["lambda"], **{k: v for k, v in data.items() if k in known})


class CalibrationRecords:
    """The calibration records of one model store (`ModelStore.calibrations`)."""

    def __init__(self, root: Path) -> None:
        self.root = root / CALIBRATIONS_DIR

    def ids(self, version: str) -> list[str]:
        """The version's calibration ids, oldest first."""
        directory = self.root / version
        if not directory.is_dir():
            return []
        found = [p.stem for p in directory.iterdir() if p.suffix == ".json" and _ID_RE.match(p.stem)]
        return sorted(found, key=calibration_sort_key)

    def active_id(self, version: str) -> str | None:
        """The id of the version's active calibration (its newest record), None without one."""
        ids = self.ids(version)
        return ids[-1] if ids else None

    def read(self, version: str, calibration_id: str) -> Calibration:
        path = self.root / version / f"{calibration_id}.json"
        try:
            record = Calibration.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"calibration {calibration_id!r} of version {version!r} is unreadable: {exc}") from exc
        if record.id != calibration_id or record.version != version:
            raise ValueError(
                f"calibration file {path.name} of version {version!r} names calibration {record.id!r} of "
                f"version {record.version!r}"
            )
        return record

    def record(self, manifest: Manifest, *, command: str, lam: float, **fields: Any) -> Calibration:
        """Write a new calibration of `manifest`'s version and return it: it becomes the active one. The record
        is checked against the manifest before it is written, and appears whole under a name no other writer
        can take (a complete temporary file linked to it)."""
        directory = self.root / manifest.version
        directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        n = 1
        while True:
            calibration = Calibration(
                id=f"c{stamp}-{n}",
                version=manifest.version,
                model_sha256=manifest.model_sha256,
                created_at=created,
                command=command,
                lam=lam,
                **fields,
            )
            calibration.apply(manifest)  # refuses a value the service would refuse, before it is written
            if write_new_file(directory / f"{calibration.id}.json", calibration.to_json_bytes()):
                return calibration
            n += 1

    def remove(self, version: str) -> None:
        """Delete a (deleted) version's records."""
        directory = self.root / version
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink()
            directory.rmdir()
