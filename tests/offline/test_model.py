"""The model scoring actions by their features (offline/model.py): the exported forward is the training
forward, another catalog is scored by the same weights, and the history reads actions by their rows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from contract.catalog import ACTION_FEATURES, Catalog
from model_store import ModelStore, load_scripted
from offline.export import PARITY_TOLERANCE, export_and_publish
from offline.logs import validate_table
from offline.model import ModelConfig, PolicyModule, SacoTransformer
from offline.train import TrainConfig, train
from research.simulate import simulate_logs
from research.world import WorldConfig

COUPONS = [
    {"action": 1, "value": 2.0},
    {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},
    {"action": 3, "value": 3.0, "min_spend": 25.0, "class": "threshold"},
]
CATALOG = Catalog.parse(COUPONS, max_per_bundle=2)  # 3 coupons of 3 classes, 6 bundles: 7 actions


def random_model(table: torch.Tensor, seed: int = 0) -> SacoTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        feature_dim=5, num_actions=len(table), context_length=5, d_model=16, action_features=table.shape[1]
    )
    model = SacoTransformer(cfg)
    model.set_action_table(table)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from the initialisation, so every path matters
    return model.eval()


def inputs(rows: int, length: int, num_actions: int, seed: int = 1, dim: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[0, :2] = False  # a user with a short history
    mask[1, :-1] = False  # a user's first decision
    actions = torch.randint(0, num_actions, (rows, length), generator=g) * mask
    actions[:, -1] = 0
    return (
        torch.randn(rows, length, dim, generator=g) * mask.unsqueeze(-1),
        actions,
        torch.randn(rows, length, generator=g) * 10 * mask,
        torch.randn(rows, length, generator=g) * mask,
        torch.arange(length).repeat(rows, 1) * mask,
        torch.rand(rows, generator=g),
        mask,
    )


def test_the_exported_forward_is_the_training_forward(tmp_path: Path) -> None:
    table = torch.from_numpy(CATALOG.action_descriptors())
    model = random_model(table)
    x = inputs(7, 5, len(table))
    with torch.inference_mode():
        reference = model.decide(*x)
        policy = PolicyModule(model).eval()
        assert torch.allclose(policy(*x), reference, atol=1e-4)
        scripted = load_scripted(_script(policy, tmp_path))
        assert torch.allclose(scripted(*x), reference, atol=1e-4)
        terms = scripted.score_terms(*x)  # revenue, cost, cost now: score = revenue - lambda cost
        k = len(table)
        assert terms.shape == (7, 3 * k)
        assert torch.allclose(terms[:, :k] - x[5].view(-1, 1) * terms[:, k : 2 * k], reference, atol=1e-4)
        assert torch.equal(scripted.catalog_scores(*x, table), scripted(*x))


def test_another_catalog_is_scored_by_the_same_weights(tmp_path: Path) -> None:
    table = torch.from_numpy(CATALOG.action_descriptors())
    scripted = load_scripted(_script(PolicyModule(random_model(table)).eval(), tmp_path))
    x = inputs(6, 5, len(table))
    added = Catalog.parse([*COUPONS, {"action": 4, "kind": "percent", "value": 20.0, "cap": 10.0}], max_per_bundle=2)
    bigger = torch.from_numpy(added.action_descriptors())
    # the added catalog's actions that the training catalog has, in its order: the same rows, the same scores
    same = [0] + [1 + [b.coupons for b in added.bundles].index(b.coupons) for b in CATALOG.bundles]
    with torch.inference_mode():
        own = scripted(*x)
        remapped = x[1].clone()
        for old, new in enumerate(same):
            remapped[x[1] == old] = new
        scored = scripted.catalog_scores(x[0], remapped, *x[2:], bigger)
        assert scored.shape == (6, len(bigger)) and torch.isfinite(scored).all()
        assert torch.allclose(scored[:, same], own, atol=1e-5)
        new = [j for j in range(len(bigger)) if j not in same]
        assert len(new) == 3  # coupon 4 alone, with coupon 1 and with coupon 3 (one coupon per class)
        assert not torch.allclose(scored[:, new], scored[:, new[:1]].expand(-1, len(new)))


def test_the_history_reads_an_action_by_its_row() -> None:
    table = torch.from_numpy(CATALOG.action_descriptors())
    twin = torch.cat([table, table[2:3]])  # action 7 gives what action 2 gives
    model = random_model(twin)
    x = inputs(5, 5, len(table))
    swapped = torch.where(x[1] == 2, len(table), x[1])
    assert (swapped != x[1]).any()
    with torch.inference_mode():
        assert torch.allclose(model.decide(x[0], swapped, *x[2:]), model.decide(*x), atol=1e-6)
        policy = PolicyModule(model).eval()
        assert torch.allclose(policy(x[0], swapped, *x[2:]), policy(*x), atol=1e-6)
        other = torch.where(x[1] == 2, 3, x[1])  # a different row: the history differs
        assert not torch.allclose(policy(x[0], other, *x[2:]), policy(*x), atol=1e-4)


def test_trained_on_bundle_logs_and_exported(tmp_path: Path) -> None:
    logs = validate_table(simulate_logs(WorldConfig(users=200, rounds=4, seed=0, catalog=CATALOG)))
    table = CATALOG.action_descriptors()
    assert table.shape == (7, len(ACTION_FEATURES))
    cfg = TrainConfig(epochs=1, d_model=16, context_length=3)
    result = train(logs, cfg, progress=False, action_table=table)
    assert result.model.by_features and result.model.cfg.action_features == len(ACTION_FEATURES)
    np.testing.assert_array_equal(result.model.action_table.numpy(), table)
    artifact = export_and_publish(result, logs, ModelStore(tmp_path / "store"))
    assert artifact.manifest.num_actions == 7 and artifact.manifest.action_features == list(ACTION_FEATURES)
    assert artifact.manifest.metrics["export_parity_max_abs_diff"] <= PARITY_TOLERANCE
    scripted = load_scripted(artifact.model_path)
    assert hasattr(scripted, "catalog_terms")
    with pytest.raises(ValueError, match="the action table has 7 rows, fewer than num_actions \\(9\\)"):
        train(logs, TrainConfig(epochs=1, num_actions=9), progress=False, action_table=table)
    with pytest.raises(ValueError, match="the logs hold action 6, beyond the 4 actions"):
        train(logs, cfg, progress=False, action_table=table[:4])


def test_by_features_needs_the_step_layout_and_the_value_objective() -> None:
    for layout, objective in (("dt4", "value"), ("step", "dt-literal")):
        with pytest.raises(ValueError, match="step layout and the value objective"):
            SacoTransformer(
                ModelConfig(feature_dim=3, num_actions=4, token_layout=layout, objective=objective, action_features=9)
            )


def test_a_model_by_index_has_no_catalog_terms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SacoTransformer(ModelConfig(feature_dim=5, num_actions=6, context_length=5, d_model=16)).eval()
    scripted = load_scripted(_script(PolicyModule(model).eval(), tmp_path))
    with pytest.raises(torch.jit.Error, match="scores actions by index"):
        scripted.catalog_scores(*inputs(2, 5, 6), torch.zeros(6, len(ACTION_FEATURES)))


def _script(module: torch.nn.Module, tmp_path: Path) -> Path:
    from model_store import save_scripted

    path = tmp_path / "policy.pt"
    save_scripted(module, path)
    return path


def test_a_table_beyond_the_coupons_alone(tmp_path: Path) -> None:
    """num_actions 4 (no coupon and the 3 coupons alone, rows 0..3) with the bundles of several coupons as
    rows 4..6: the export scores the coupons alone, `catalog_terms` every row."""
    logs = validate_table(simulate_logs(WorldConfig(users=200, rounds=4, seed=0, catalog=CATALOG)))
    table = CATALOG.action_descriptors()
    result = train(logs, TrainConfig(epochs=1, d_model=16, context_length=3, num_actions=4), False, action_table=table)
    assert (result.model.num_actions, result.model.action_table.shape[0]) == (4, 7)
    artifact = export_and_publish(result, logs, ModelStore(tmp_path / "store"))
    assert artifact.manifest.num_actions == 4
    scripted = load_scripted(artifact.model_path)
    x = inputs(5, 3, len(table), dim=logs.feature_dim)
    with torch.inference_mode():
        own = scripted.score_terms(*x)
        every = scripted.catalog_terms(*x, torch.from_numpy(table))
    assert own.shape == (5, 12) and every.shape == (5, 21)
    assert torch.allclose(every.view(5, 3, 7)[:, :, :4].reshape(5, 12), own, atol=1e-5)


def test_a_table_read_at_a_given_scale() -> None:
    """A model that goes on training on another table keeps the scale its weights read the columns at."""
    table = torch.from_numpy(CATALOG.action_descriptors())
    model = random_model(table)
    largest = table.abs().amax(0)
    own = model.action_scale.clone()
    assert torch.equal(own, torch.where(largest > 0, largest, torch.ones_like(largest)))  # a column's largest
    larger = table * 2
    model.set_action_table(larger, own)
    assert torch.equal(model.action_table, larger) and torch.equal(model.action_scale, own)
    model.set_action_table(larger)  # without a scale: the table's own
    assert torch.equal(model.action_scale, torch.where(largest > 0, 2 * largest, torch.ones_like(largest)))
    for bad in (torch.zeros_like(own), torch.ones(len(own) + 1), torch.full_like(own, float("nan"))):
        with pytest.raises(ValueError, match="the action table's scale must be"):
            model.set_action_table(table, bad)
