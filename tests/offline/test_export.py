import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store import ArtifactError, ModelStore, load_scripted
from offline.export import PARITY_TOLERANCE, export_and_publish, parity_batch
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
    result = train(tiny_logs, TrainConfig(epochs=1, d_model=16, n_heads=2, context_length=3, token_layout=layout,
                                          objective=objective), progress=False)
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
    out = subprocess.run([sys.executable, "-c", code, str(artifact.model_path)], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert json.loads(out.stdout) == [2, 4]


def test_corrupted_export_is_refused(tmp_path: Path, tiny_logs, tiny_model):
    store = ModelStore(tmp_path / "store")
    artifact = export_and_publish(tiny_model, tiny_logs, store)
    data = artifact.model_path.read_bytes()
    artifact.model_path.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ArtifactError, match="checksum"):
        store.load()


@pytest.mark.parametrize("n_layers", [1, 2])
def test_padding_does_not_change_the_decision(n_layers: int):
    """The decision path (one query, key/value projections folded into it) equals the training forward's
    last step, and padded steps do not move it."""
    model = SacoTransformer(ModelConfig(feature_dim=3, num_actions=4, context_length=5, future_weight=1.0,
                                        n_layers=n_layers)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():  # not the initial zero biases: every term must count
            parameter.normal_(0.0, 0.3)
    B, L = 2, 5
    mask = torch.tensor([[False, False, True, True, True]] * 2)
    x = [torch.randn(B, L, 3), torch.randint(0, 4, (B, L)), torch.randn(B, L), torch.randn(B, L),
         torch.arange(L).repeat(B, 1), torch.rand(B), mask]
    with torch.inference_mode():
        a = model.decide(*x)
        x[0] = x[0].clone()
        x[0][:, :2] = 1e3  # garbage in the padded steps
        b = model.decide(*x)
        __, values = model(*x)
    assert torch.equal(a, b)
    full = (values[:, -1, 0] + values[:, -1, 2]) * model.rtg_scale - x[5].view(-1, 1) * (
        values[:, -1, 1] + values[:, -1, 3]) * model.ctg_scale
    assert torch.allclose(a, full, atol=1e-5)
