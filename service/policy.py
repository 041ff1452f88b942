"""The served policy: load a model-store version with its active calibration, verify it, run forwards, swap
atomically when the version or its calibration changes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import torch

from contract.catalog import ACTION_FEATURES, Catalog, Coupon
from contract.inputs import ModelInputs
from model_store import Artifact, ArtifactError, Manifest, ModelStore, load_scripted

log = logging.getLogger("saco.service.policy")


class PolicyRejected(RuntimeError):
    """A model version that must not serve (checksum, dimensions, failing forward)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PolicyRejected("SACO_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


@dataclass(frozen=True)
class LoadedPolicy:
    artifact: Artifact
    module: torch.jit.ScriptModule
    device: torch.device

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def calibration_id(self) -> str | None:
        """The calibration record serving (None: the manifest's own lambda values)."""
        calibration = self.artifact.calibration
        return None if calibration is None else calibration.id

    @property
    def by_features(self) -> bool:
        """Whether the model scores actions by their features (the manifest's `action_features`): it is given
        each campaign's action table (contract/catalog.py `ActionRows`) and scores its bundles itself."""
        return bool(self.manifest.action_features)

    @property
    def outputs(self) -> int:
        """Columns of `scores`: K scores, or, when the manifest says `score_terms`, 3 K score terms."""
        return self.manifest.num_actions * (3 if self.manifest.score_terms else 1)

    def scores(self, inputs: ModelInputs, table: np.ndarray | None = None) -> np.ndarray:
        """f32 [B, num_actions]: the scores at each row's lambda; or, when the manifest says `score_terms`,
        [B, 3 num_actions]: the revenue and cost terms of the scores and each coupon's expected cost now
        (`score_terms` of the exported module). A model scoring by features, given an action table [T, F]
        (`table`, the inputs' actions being its rows): [B, 3T], the terms of each of its rows
        (`catalog_terms`). Blocking: call it on the inference thread."""
        device = self.device
        arrays = [torch.from_numpy(a).to(device) for a in inputs.arrays()]
        with torch.inference_mode():
            if table is not None:
                out = self.module.catalog_terms(*arrays, torch.from_numpy(table).to(device))
            elif self.manifest.score_terms:
                out = self.module.score_terms(*arrays)
            else:
                out = self.module(*arrays)
        scores: np.ndarray = out.float().cpu().numpy()
        return scores


def smoke_inputs(manifest: Manifest, rows: int = 2) -> ModelInputs:
    """Two users at the manifest's targets, one with a padded first position when the context allows it."""
    length = min(2, manifest.context_length)
    inputs = ModelInputs.zeros(rows, length, manifest.feature_dim)
    inputs.rtg.fill(manifest.initial_rtg)
    inputs.ctg.fill(manifest.initial_ctg)
    inputs.timesteps[:] = np.arange(length)
    inputs.mask.fill(True)
    if length > 1:
        inputs.mask[0, 0] = False
    return inputs


def smoke_table(manifest: Manifest) -> np.ndarray:
    """A small action table for a model scoring by features: a catalog of its first (at most three) coupon
    actions, amounts of 1, 2, 3 (currency units), and a bundle of the first two when there are two."""
    actions = list(range(1, min(4, manifest.num_actions)))
    coupons = [Coupon(a, 100 * a) for a in actions]
    bundles = [[a] for a in actions] + ([actions[:2]] if len(actions) > 1 else [])
    return Catalog.build(coupons, bundles).action_rows(manifest.num_actions).table


def load_policy(
    store_root: str, device_name: str, version: str | None = None, loaded: LoadedPolicy | None = None
) -> LoadedPolicy:
    """Load and verify a version with its active calibration: checksums (model store), then a test forward of
    the expected shape. When `loaded` is the same version (the same manifest and model file), its module
    serves on and only the calibration is new."""
    try:
        artifact = ModelStore(store_root).load(version)
    except ArtifactError as exc:
        raise PolicyRejected(str(exc)) from exc
    _check_action_features(artifact)
    if loaded is not None and loaded.artifact.published == artifact.published:  # the same version, verified again
        return LoadedPolicy(artifact, loaded.module, loaded.device)
    device = resolve_device(device_name)
    try:
        module = load_scripted(artifact.model_path, device)
    except Exception as exc:  # a corrupt or incompatible TorchScript file
        raise PolicyRejected(f"version {artifact.version!r}: cannot load the TorchScript model: {exc}") from exc
    policy = LoadedPolicy(artifact, module, device)
    manifest = artifact.manifest
    _smoke_test(policy, None)
    if policy.by_features:
        _smoke_test(policy, smoke_table(manifest))
    return policy


def _check_action_features(artifact: Artifact) -> None:
    """A model scoring by features must read the action table the service builds (contract/catalog.py)."""
    names = artifact.manifest.action_features
    if names and names != list(ACTION_FEATURES):
        raise PolicyRejected(
            f"version {artifact.version!r}: the manifest's action_features {names} are not the action table "
            f"this service builds ({list(ACTION_FEATURES)}, contract/catalog.py ACTION_FEATURES)"
        )


def _smoke_test(policy: LoadedPolicy, table: np.ndarray | None) -> None:
    """A test forward of the expected shape and finite (`table`: `catalog_terms` on that action table)."""
    version = policy.version
    what = "test forward" if table is None else f"test forward of catalog_terms on a {len(table)}-row action table"
    try:
        scores = policy.scores(smoke_inputs(policy.manifest), table)
    except Exception as exc:
        raise PolicyRejected(f"version {version!r}: {what} failed: {exc}") from exc
    columns = policy.outputs if table is None else 3 * len(table)
    if scores.shape != (2, columns):
        raise PolicyRejected(
            f"version {version!r}: {what} gave shape {tuple(scores.shape)}, the manifest says (batch, {columns})"
        )
    if not np.isfinite(scores).all():
        raise PolicyRejected(f"version {version!r}: {what} gave non-finite scores")


class PolicyHolder:
    """The serving policy; `reload` verifies a candidate off the event loop, then swaps the reference."""

    def __init__(self, policy: LoadedPolicy, store_root: str, device_name: str) -> None:
        self.current = policy
        self._store_root = store_root
        self._device_name = device_name
        self._reload_lock = asyncio.Lock()

    async def reload(self, version: str | None = None) -> tuple[LoadedPolicy, LoadedPolicy]:
        """Serve `version` (default: the store's current one) with its active calibration: (previous, new).
        Raises PolicyRejected and keeps the incumbent when the candidate fails. A named version already
        serving with the same calibration is not loaded again; the default is always verified anew."""
        async with self._reload_lock:
            previous = self.current
            if version is not None and version == previous.version:
                try:
                    active = await asyncio.to_thread(ModelStore(self._store_root).calibrations.active_id, version)
                except (OSError, ValueError) as exc:
                    raise PolicyRejected(f"version {version!r}: {exc}") from exc
                if active == previous.calibration_id:
                    return previous, previous
            candidate = await asyncio.to_thread(load_policy, self._store_root, self._device_name, version, previous)
            old, new = previous.manifest, candidate.manifest
            for field in ("feature_dim", "num_actions"):
                if getattr(old, field) != getattr(new, field):
                    raise PolicyRejected(
                        f"version {candidate.version!r} changes {field} from {getattr(old, field)} to "
                        f"{getattr(new, field)}; that changes the API and the stored contexts, so it needs a "
                        "new deployment, not a reload"
                    )
            self.current = candidate
            log.info(
                "model swapped",
                extra={
                    "previous": previous.version,
                    "previous_calibration": previous.calibration_id,
                    "version": candidate.version,
                    "calibration": candidate.calibration_id,
                },
            )
            return previous, candidate
