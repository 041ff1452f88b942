"""The smallest artifact the model store accepts: a scripted module that halves its input, and a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_store import ModelStore, save_scripted

MANIFEST: dict[str, Any] = {
    "feature_dim": 3,
    "num_actions": 4,
    "context_length": 5,
    "max_timestep": 16,
    "objective": "value",
    "initial_rtg": 10.0,
    "initial_ctg": 2.0,
    "default_lambda": 0.5,
}


class Half(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


def published(tmp_path: Path, *not_current: str) -> ModelStore:
    """A store under `tmp_path` with version v1 current and the `not_current` versions beside it."""
    model = tmp_path / "m.pt"
    save_scripted(Half(), model)
    store = ModelStore(tmp_path / "store")
    store.publish(model, MANIFEST, version="v1")
    for version in not_current:
        store.publish(model, MANIFEST, version=version, make_current=False)
    return store
