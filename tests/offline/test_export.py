import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store import ArtifactError, ModelStore, load_scripted
from offline.export import PARITY_TOLERANCE, export_and_publish, parity_batch, write_policy
from offline.model import ModelConfig, PolicyModule, SacoTransformer
from offline.train import TrainConfig, train


def test_scripted_matches_eager_and_manifest_is_complete(tmp_path: Path, tiny_logs, tiny_model):
    store = ModelStore(tmp_path / "store")
    artifact = export_and_publish(tiny_model, tiny_logs, store)
    m = artifact.manifest
    assert (m.feature_dim, m.num_actions, m.context_length) == (8, 4, 4)
    assert m.metrics["export_parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert m.data_sha256 == tiny_logs.sha256 and len(m.normalisation["state_mean"]) == 8
    inputs = parity_batch(tiny_model, n=64, seed=3)
    with torch.inference_mode():
        eager = PolicyModule(tiny_model.model)(*inputs)
        scripted = load_scripted(artifact.model_path)(*inputs)
    assert eager.shape == (64, 4)
    assert torch.allclose(eager, scripted, atol=PARITY_TOLERANCE)


@pytest.mark.parametrize(("layout", "objective"), [("dt4", "dt-literal"), ("step", "dt-lagrangian")])
def test_other_variants_export(tmp_path: Path, tiny_logs, layout: str, objective: str):
    result = train(
        tiny_logs,
        TrainConfig(epochs=1, d_model=16, n_heads=2, context_length=3, token_layout=layout, objective=objective),
        progress=False,
    )
    artifact = export_and_publish(result, tiny_logs, ModelStore(tmp_path / "s"))
    assert artifact.manifest.objective == objective


def test_exported_file_runs_without_the_project(tmp_path: Path, tiny_logs, tiny_model):
    artifact = export_and_publish(tiny_model, tiny_logs, ModelStore(tmp_path / "store"))
    code = (
        "import sys, torch, json; m = torch.jit.load(sys.argv[1]); B, L = 2, 4;"
        "out = m(torch.zeros(B, L, 8), torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L), torch.zeros(B, L),"
        "torch.arange(L).repeat(B, 1), torch.zeros(B), torch.ones(B, L, dtype=torch.bool));"
        "assert not any(k.split('.')[0] in ('offline', 'saco', 'service', 'model_store') for k in sys.modules);"
        "print(json.dumps(list(out.shape)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact.model_path)], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert json.loads(out.stdout) == [2, 4]


def test_corrupted_export_is_refused(tmp_path: Path, tiny_logs, tiny_model):
    store = ModelStore(tmp_path / "store")
    artifact = export_and_publish(tiny_model, tiny_logs, store)
    data = artifact.model_path.read_bytes()
    artifact.model_path.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="checksum"):
        store.load()


def random_model(seed: int, **config) -> SacoTransformer:
    """Every parameter and normalisation buffer random (not the initial zero biases: every term must count)."""
    torch.manual_seed(seed)
    model = SacoTransformer(ModelConfig(feature_dim=3, num_actions=4, context_length=5, **config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
        model.set_normalisation(torch.randn(3), torch.rand(3) + 0.5, 2.5, 1.5)
    return model.eval()


def padded_inputs(batch: int, length: int, max_timestep: int, seed: int) -> list[torch.Tensor]:
    """Right-aligned contexts of every length from 1 (a first step) to `length`, with garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length) >= length - (torch.arange(batch) % length + 1).view(-1, 1)
    states = torch.randn(batch, length, 3, generator=g) * 2 + 1
    actions = torch.randint(0, 4, (batch, length), generator=g)
    # to-go values that drop by a reward and cost at some steps and stay at others (purchase or not)
    rtg = (torch.rand(batch, length, generator=g) * 4 * (torch.rand(batch, length, generator=g) < 0.5)).flip(1)
    rtg = rtg.cumsum(1).flip(1) + torch.rand(batch, 1, generator=g)
    ctg = torch.rand(batch, length, generator=g).flip(1).cumsum(1).flip(1)
    timesteps = torch.randint(0, max_timestep + 10, (batch, length), generator=g)  # beyond the table: clamped
    lam = torch.rand(batch, generator=g) * 2
    padding = ~mask
    states[padding], rtg[padding], ctg[padding] = 1e3, -7.0, 5.0
    actions[padding] = 3
    return [states, actions, rtg, ctg, timesteps, lam, mask]


@pytest.mark.parametrize(
    "config",
    [
        {"future_weight": 0.0},
        {"future_weight": 0.7},
        {"n_layers": 2},
        {"history_decays": ()},
        {"objective": "dt-lagrangian"},
        {"token_layout": "dt4", "objective": "dt-literal"},
    ],
)
def test_policy_is_the_training_forward_at_the_decision(tmp_path: Path, config: dict):
    """The exported policy (weights folded together) gives the training forward's scores at the last step,
    eager and as saved TorchScript, for contexts of every length, shorter and longer ones included; garbage
    in padded steps moves nothing."""
    model = random_model(0, **config)
    module = write_policy(model, tmp_path / "model.pt")
    scripted = load_scripted(tmp_path / "model.pt")
    for length in (5, 1, 3, 7):
        x = padded_inputs(16, length, model.cfg.max_timestep, seed=length)
        clean = [t.clone() for t in x]
        padding = ~x[6]
        clean[0][padding], clean[1][padding], clean[2][padding], clean[3][padding] = 0.0, 0, 0.0, 0.0
        with torch.inference_mode():
            reference = model.decide(*x)
            eager, eager_clean = module(*x), module(*clean)
            exported, exported_clean = scripted(*x), scripted(*clean)
        assert torch.equal(eager, eager_clean) and torch.equal(exported, exported_clean)
        assert torch.allclose(reference, model.decide(*clean), atol=1e-5)
        assert (eager - reference).abs().max() <= 1e-5, length
        assert (exported - eager).abs().max() <= 1e-6, length
        x[6][0] = False  # no real step at all: the decision token still sees itself
        with torch.inference_mode():
            reference, exported = model.decide(*x), scripted(*x)
        assert torch.isfinite(exported).all() and (exported - reference).abs().max() <= 1e-5, length


def test_policy_module_adds_nothing_to_the_checkpoint():
    """The folded tensors are derived, not saved: a model's state dict loads as before."""
    model = random_model(1)
    module = PolicyModule(model)
    assert set(module.state_dict()) == {f"model.{key}" for key in model.state_dict()}
    fresh = SacoTransformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    x = padded_inputs(4, 5, model.cfg.max_timestep, seed=0)
    with torch.inference_mode():
        assert torch.equal(PolicyModule(fresh.eval())(*x), module(*x))
