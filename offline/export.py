"""Export a trained model as a TorchScript policy + manifest and publish it in the model store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contract.catalog import ACTION_FEATURES
from model_store import Artifact, ModelStore, load_scripted, save_scripted
from offline.logs import Logs
from offline.model import PolicyModule, SacoTransformer, parameter_count
from offline.train import StreamResult, TrainResult, config_dict
from offline.trajectories import make_batch

PARITY_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """The scripted policy does not reproduce the eager model, or fails its smoke test."""


def parity_batch(result: TrainResult, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Real inputs from held-out windows (with padding) to compare eager and scripted outputs."""
    traj = result.trajectories
    windows = traj.windows(loss_on_every_step=False)
    rng = np.random.default_rng(seed)
    pick = windows[rng.choice(len(windows), size=min(n, len(windows)), replace=False)]
    lam = rng.uniform(0.0, 2.0, size=len(pick))
    cfg = result.config
    return make_batch(traj, pick, cfg.objective, lam, result.initial_rtg, result.initial_ctg, cfg.max_timestep).inputs


def smoke_test(module: torch.nn.Module, feature_dim: int, num_actions: int, context_length: int) -> None:
    """A forward on a padded batch must give finite [B, K] scores."""
    b, L = 3, context_length
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, : L - 1] = False  # a user at their first step
    with torch.inference_mode():
        out = module(
            torch.zeros(b, L, feature_dim),
            torch.zeros(b, L, dtype=torch.long),
            torch.zeros(b, L),
            torch.zeros(b, L),
            torch.arange(L).repeat(b, 1),
            torch.zeros(b),
            mask,
        )
    if tuple(out.shape) != (b, num_actions) or not torch.isfinite(out).all():
        raise ExportError(f"policy smoke test failed: output shape {tuple(out.shape)}, expected {(b, num_actions)}")


def write_policy(model: SacoTransformer, path: Path) -> PolicyModule:
    """Write what is exported for `model` (its `PolicyModule`, scripted) to `path`; returns the eager module."""
    module = PolicyModule(model.eval()).eval()
    save_scripted(module, path)
    return module


def export_and_publish(
    result: TrainResult,
    logs: Logs,
    store: ModelStore,
    extra_metrics: dict[str, Any] | None = None,
    make_current: bool = True,
) -> Artifact:
    """Export and publish a model trained on `logs` in memory."""
    action_costs = [
        float(logs.cost[logs.action == a].mean()) if np.any(logs.action == a) else 0.0
        for a in range(result.model.cfg.num_actions)
    ]
    return publish(result, parity_batch(result), action_costs, logs.sha256, store, extra_metrics, make_current)


def export_and_publish_stream(
    result: StreamResult, store: ModelStore, extra_metrics: dict[str, Any] | None = None, make_current: bool = True
) -> Artifact:
    """Export and publish a model trained from window shards (`train_windows`)."""
    return publish(
        result, result.parity_inputs, result.action_costs, result.data_sha256, store, extra_metrics, make_current
    )


def publish(
    result: TrainResult | StreamResult,
    inputs: tuple[torch.Tensor, ...],
    action_costs: list[float],
    data_sha256: str,
    store: ModelStore,
    extra_metrics: dict[str, Any] | None = None,
    make_current: bool = True,
) -> Artifact:
    """Script the model's policy, check it against the model on `inputs` (ExportError if they differ), and
    publish it with its manifest: `action_costs` the mean logged cost per action, `data_sha256` the training
    data's hash."""
    model = result.model.eval()
    cfg = model.cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        module = write_policy(model, path)
        loaded = load_scripted(path)
        with torch.inference_mode():
            reference, eager, scripted = model.decide(*inputs), module(*inputs), loaded(*inputs)
        diff = float((eager - scripted).abs().max())
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"scripted policy differs from the eager model by {diff:.2e} (> {PARITY_TOLERANCE})")
        # the policy folds the model's weights together: same scores as the training forward, up to float32
        # rounding (relative to the scores' size: with a revenue scale of ~100 they reach ~40)
        folded = float((eager - reference).abs().max()) / max(1.0, float(reference.abs().max()))
        if not folded <= PARITY_TOLERANCE:
            raise ExportError(
                f"policy differs from the model's forward by {folded:.2e} of the largest score (> {PARITY_TOLERANCE})"
            )
        if model.value_objective:  # the expected costs the service reserves by, against the training forward
            k = cfg.num_actions
            with torch.inference_mode():
                _, values = model(*inputs)
                terms = loaded.score_terms(*inputs)
            rebuilt = terms[:, :k] - inputs[5].view(-1, 1) * terms[:, k : 2 * k]
            costs = terms[:, 2 * k :]
            size = max(1.0, float(reference.abs().max()), float(costs.abs().max()))
            cost_now = values[:, -1, 1, :k] * model.ctg_scale
            terms_diff = max(float((rebuilt - reference).abs().max()), float((costs - cost_now).abs().max()))
            if not terms_diff <= PARITY_TOLERANCE * size:
                raise ExportError(f"scripted score terms differ from the model's by {terms_diff:.2e}")
        if model.by_features and cfg.action_features != len(ACTION_FEATURES):
            raise ExportError(
                f"the model reads {cfg.action_features} action features, the service describes actions by "
                f"{len(ACTION_FEATURES)} (contract/catalog.py ACTION_FEATURES): train it on `action_descriptors`"
            )
        manifest = {
            "feature_dim": cfg.feature_dim,
            "num_actions": cfg.num_actions,
            "context_length": cfg.context_length,
            "max_timestep": cfg.max_timestep,
            "objective": cfg.objective,
            "initial_rtg": result.initial_rtg,
            "initial_ctg": result.initial_ctg,
            "normalisation": {
                "state_mean": model.state_mean.tolist(),
                "state_std": model.state_std.tolist(),
                "rtg_scale": float(model.rtg_scale),
                "ctg_scale": float(model.ctg_scale),
            },
            "action_costs": action_costs,
            "score_terms": bool(model.value_objective),
            "action_features": list(ACTION_FEATURES) if model.by_features else [],
            "data_sha256": data_sha256,
            "metrics": {
                **result.metrics,
                "export_parity_max_abs_diff": diff,
                "parameters": parameter_count(model),
                "train_seconds": round(result.seconds, 1),
                **(extra_metrics or {}),
            },
            "model_config": {**cfg.to_dict(), "train": config_dict(result.config)},
        }

        def validate(artifact: Artifact) -> None:
            smoke_test(load_scripted(artifact.model_path), cfg.feature_dim, cfg.num_actions, cfg.context_length)

        return store.publish(path, manifest, make_current=make_current, validate=validate)
