"""Small policies of the real model (offline/model.py, random weights, scripted and published as the export
publishes them), for serving tests: one scoring coupons and bundles by their features, one by index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.catalog import ACTION_FEATURES, Catalog
from contract.inputs import ModelInputs
from model_store import Artifact, ModelStore, save_scripted
from offline.model import ModelConfig, PolicyModule, SacoTransformer

FEATURE_DIM = 3
NUM_ACTIONS = 6  # coupon actions 1..5
CONTEXT_LENGTH = 4
# the catalog a feature model was trained on: coupons 1 and 2 alone (3, 4 and 5 it never saw)
TRAINING_CATALOG = Catalog.parse([{"action": 1, "value": 2.0}, {"action": 2, "value": 5.0}])


def _model(action_features: int, seed: int) -> SacoTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        feature_dim=FEATURE_DIM,
        num_actions=NUM_ACTIONS,
        context_length=CONTEXT_LENGTH,
        max_timestep=16,
        d_model=16,
        action_features=action_features,
    )
    model = SacoTransformer(cfg)
    if action_features:
        model.set_action_table(torch.from_numpy(TRAINING_CATALOG.action_rows(NUM_ACTIONS).table[:NUM_ACTIONS]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from the initialisation, so that every path matters
    return model.eval()


def publish(
    store_root: Path,
    *,
    by_features: bool,
    seed: int = 0,
    version: str | None = None,
    make_current: bool = True,
    **manifest_changes: Any,
) -> Artifact:
    """Publish a random policy of the real model into the store at `store_root`: by features (its manifest's
    `action_features` the contract's names) or by index."""
    model = _model(len(ACTION_FEATURES) if by_features else 0, seed)
    path = store_root.parent / f"policy-{seed}-{int(by_features)}.pt"
    save_scripted(PolicyModule(model).eval(), path)
    manifest: dict[str, Any] = {
        "feature_dim": FEATURE_DIM,
        "num_actions": NUM_ACTIONS,
        "context_length": CONTEXT_LENGTH,
        "max_timestep": 16,
        "objective": "value",
        "initial_rtg": 20.0,
        "initial_ctg": 4.0,
        "score_terms": True,
        "action_features": list(ACTION_FEATURES) if by_features else [],
        "default_lambda": 0.0,
        **manifest_changes,
    }
    return ModelStore(store_root).publish(path, manifest, version=version, make_current=make_current)


def random_inputs(rows: int, length: int, actions: np.ndarray | int, seed: int) -> ModelInputs:
    """Model inputs of `rows` users with full histories of `length` steps whose past actions are drawn from
    `actions` (an int: 0..actions-1)."""
    rng = np.random.default_rng(seed)
    past = rng.choice(actions, size=(rows, length))
    past[:, -1] = 0
    return ModelInputs(
        states=rng.normal(size=(rows, length, FEATURE_DIM)).astype(np.float32),
        actions=past.astype(np.int64),
        rtg=rng.uniform(0, 20, size=(rows, length)).astype(np.float32),
        ctg=rng.uniform(0, 4, size=(rows, length)).astype(np.float32),
        timesteps=np.tile(np.arange(length), (rows, 1)),
        lam=rng.uniform(0, 1, size=rows).astype(np.float32),
        mask=np.ones((rows, length), np.bool_),
    )
