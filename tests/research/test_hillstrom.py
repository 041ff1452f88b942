"""The Hillstrom mapping: arm means match the data README, logs are valid, IPS is unbiased, the fitted
sequential world reproduces the measured visit rates."""

from __future__ import annotations

import os

import numpy as np
import pytest

from research import hillstrom as hs

try:
    DATA = hs.load_hillstrom()
except hs.HillstromError as exc:  # pragma: no cover
    if os.environ.get("CI"):  # CI clones shared/ beside the repo: the data must be there
        raise
    pytest.skip(str(exc), allow_module_level=True)


def test_arm_means_match_the_readme() -> None:
    m = DATA.arm_means()
    assert DATA.n == 64_000
    np.testing.assert_allclose(m["visit"], [0.106, 0.183, 0.151], atol=0.0006)
    np.testing.assert_allclose(m["conversion"], [0.0057, 0.0125, 0.0088], atol=0.00006)
    np.testing.assert_allclose(m["spend"], [0.65, 1.42, 1.08], atol=0.006)
    assert np.bincount(DATA.arm).min() > 21_000  # randomised: about a third each


def test_logs_mapping() -> None:
    train, held = hs.split(DATA, 3000, seed=0)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 3000
    logs = hs.to_logs(DATA, train)
    assert logs.feature_dim == len(hs.FEATURES) == 11
    assert logs.num_actions == 3 and set(np.unique(logs.t)) == {0}
    assert np.all(logs.cost[logs.action == 0] == 0)  # no e-mail costs nothing
    emailed = logs.action > 0
    np.testing.assert_array_equal(logs.cost[emailed], hs.EMAIL_COST * DATA.visit[train][emailed])
    np.testing.assert_allclose(logs.reward, DATA.spend[train])
    one_hot = logs.features[:, 5:11]
    np.testing.assert_array_equal(one_hot[:, :3].sum(1), 1)  # zip one-hot
    np.testing.assert_array_equal(one_hot[:, 3:].sum(1), 1)  # channel one-hot


def test_ips_recovers_the_arm_means() -> None:
    rows = np.arange(DATA.n)
    for a in range(3):
        revenue, _ = hs.ips_estimate(np.full(DATA.n, a), DATA, rows)
        truth = DATA.spend[DATA.arm == a].mean()
        assert abs(revenue / DATA.n - truth) < 0.05 * truth + 0.02


def test_missing_file_is_one_clear_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SACO_HILLSTROM", str(tmp_path / "nope.csv"))
    with pytest.raises(hs.HillstromError, match="not found"):
        hs.load_hillstrom()


def test_fitted_world_matches_visit_rates() -> None:
    world = hs.fit_hillstrom_world(DATA.arm_means(), hs.hillstrom_world_config(500, 4, 0), n=5000)
    got = hs.world_marginals(world, 5000)
    np.testing.assert_allclose(got["visit"], DATA.arm_means()["visit"], atol=0.003)
    assert got["spend"][1] > got["spend"][2] > got["spend"][0]  # mens > womens > none, as measured
