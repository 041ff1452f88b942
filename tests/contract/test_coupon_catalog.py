"""The coupon catalog's rules (contract/catalog.py) and the ranking of bundles (contract/ranking.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from contract.catalog import ACTION_FEATURES, MAX_BUNDLES, Catalog, CatalogError, Coupon, dominant
from contract.ranking import bundle_ranking, bundle_scores, first_fit, first_fit_bundles, ranking

COUPONS: list[dict[str, Any]] = [
    {"action": 1, "cost": 2.0},
    {"action": 2, "kind": "percent", "value": 12.5, "cap": 8.0, "min_spend": 20.0},
    {"action": 3, "kind": "amount", "value": 5.0, "stock": 10, "class": "percent"},
]


def test_the_public_form_in_cents_and_hundredths_of_a_percent() -> None:
    catalog = Catalog.parse(COUPONS)
    assert catalog.coupons == (
        Coupon(1, 200),
        Coupon(2, 1250, "percent", cap=800, min_spend=2000),
        Coupon(3, 500, stock=10, group="percent"),
    )
    assert catalog.costs == {1: 200, 2: 800, 3: 500}  # a percent coupon costs its cap at worst
    assert catalog.stock == {3: 10}
    assert [(b.action, b.coupons) for b in catalog.bundles] == [(1, (1,)), (2, (2,)), (3, (3,))]
    assert not catalog.plain and Catalog.parse(COUPONS[:1]).plain
    assert Catalog.from_json(catalog.to_json()) == catalog
    assert catalog.coupons[1].public()["value"] == 12.5 and catalog.coupons[1].public()["cost"] == 8.0


def test_features_as_arrays() -> None:
    features = Catalog.parse(COUPONS).features()
    np.testing.assert_array_equal(features.actions, [1, 2, 3])
    np.testing.assert_array_equal(features.kind, [0, 1, 0])
    np.testing.assert_allclose(features.value, [2.0, 0.125, 5.0])
    np.testing.assert_allclose(features.cap, [0.0, 8.0, 0.0])
    np.testing.assert_allclose(features.min_spend, [0.0, 20.0, 0.0])
    np.testing.assert_allclose(features.worst_case, [2.0, 8.0, 5.0])


def test_the_bundle_rule_one_coupon_per_class() -> None:
    # classes: 1 amount, 2 percent, 3 "percent" (its own class names it so)
    catalog = Catalog.parse(COUPONS, max_per_bundle=3)
    assert [b.coupons for b in catalog.bundles] == [(1,), (2,), (3,), (1, 2), (1, 3)]
    assert [b.action for b in catalog.bundles] == [1, 2, 3, 1_000_004, 1_000_005]
    assert catalog.bundle_cost(catalog.bundles[3]) == 1000
    assert catalog.ledger_bundles() == '{"1":[1,1],"2":[2,2],"3":[3,3],"1+2":[1000004,1,2],"1+3":[1000005,1,3]}'
    listed = Catalog.parse(COUPONS, bundles=[[3, 1], [2]], max_per_bundle=2)  # a list is taken as given
    assert [(b.action, b.coupons, b.key) for b in listed.bundles] == [(1_000_001, (1, 3), "1+3"), (2, (2,), "2")]
    many = [{"action": a, "cost": 1.0, "class": f"c{a}"} for a in range(1, 41)]
    with pytest.raises(CatalogError, match=f"allows 10700 bundles of these coupons, more than {MAX_BUNDLES}") as caught:
        Catalog.parse(many, max_per_bundle=3)  # 40 + 780 + 9880 bundles
    assert caught.value.loc == ("max_per_bundle",)


@pytest.mark.parametrize(
    ("coupons", "bundles", "per_bundle", "loc", "words"),
    [
        ([{"action": 1, "kind": "percent", "value": 10.0}], None, None, ("coupons", 0, "cap"), "needs a cap"),
        ([{"action": 1, "cost": 2.0, "cap": 1.0}], None, None, ("coupons", 0, "cap"), "percent coupons only"),
        ([{"action": 1, "kind": "percent", "value": 0.0, "cap": 1.0}], None, None, ("coupons", 0, "value"), "above 0"),
        ([{"action": 1, "kind": "percent", "value": 100.5, "cap": 1.0}], None, None, ("coupons", 0, "value"), "100"),
        ([{"action": 1, "kind": "percent", "cost": 1.0, "cap": 1.0}], None, None, ("coupons", 0, "cost"), "value"),
        ([{"action": 1, "value": -1.0}], None, None, ("coupons", 0, "value"), "above 0"),
        ([{"action": 1, "cost": 1.0, "min_spend": -0.01}], None, None, ("coupons", 0, "min_spend"), "negative"),
        ([{"action": 1, "cost": 1.0, "stock": -1}], None, None, ("coupons", 0, "stock"), "0.."),
        ([{"action": 1, "cost": 1.0, "stock": 1.5}], None, None, ("coupons", 0, "stock"), "integer"),
        ([{"action": 1, "cost": 1.0, "kind": "bogo"}], None, None, ("coupons", 0, "kind"), "one of"),
        ([{"action": 1, "cost": 1.0, "colour": "red"}], None, None, ("coupons", 0, "colour"), "not a coupon field"),
        ([{"action": 0, "cost": 1.0}], None, None, ("coupons", 0, "action"), "1.."),
        ([{"action": 1, "cost": 1.0}, {"action": 1, "cost": 2.0}], None, None, ("coupons", 1, "action"), "twice"),
        ([{"action": 1, "cost": 1.0}], [[1, 4]], None, ("bundles", 0, 1), "not in the catalog"),
        ([{"action": 1, "cost": 1.0}], [[1, 1]], None, ("bundles", 0, 1), "twice in this bundle"),
        ([{"action": 1, "cost": 1.0}], [[]], None, ("bundles", 0), "always allowed"),
        ([{"action": 1, "cost": 1.0}, {"action": 2, "cost": 1.0}], [[2, 1], [1, 2]], None, ("bundles", 1),
         "same bundle as bundles[0]"),
        ([{"action": 1, "cost": 1.0}, {"action": 2, "cost": 1.0}], [[1, 2]], 1, ("bundles", 0),
         "more than max_per_bundle (1)"),
        ([{"action": 1, "cost": 1.0}], None, 0, ("max_per_bundle",), "1..8"),
    ],
)  # fmt: skip
def test_each_rule_names_its_field(
    coupons: list[dict[str, Any]], bundles: list[list[int]] | None, per_bundle: int | None, loc: tuple[Any], words: str
) -> None:
    with pytest.raises(CatalogError) as caught:
        Catalog.parse(coupons, bundles, per_bundle)
    assert caught.value.loc == loc and words in caught.value.msg, caught.value


def test_a_bundles_score_adds_its_coupons_gains_over_none() -> None:
    scores = np.array([[1.0, 3.0, 0.5, 2.0], [0.0, np.nan, 1.0, 1.0]], np.float32)
    bundles = [(1,), (2,), (1, 3), (2, 3), (1, 2, 3)]
    np.testing.assert_allclose(bundle_scores(scores[:1], bundles), [[1.0, 3.0, 0.5, 4.0, 1.5, 3.5]])
    lists, index, priority = bundle_ranking(scores, bundles)
    assert lists[index[0]] == [3, 5, 1, 4, 0]  # 1+3, 1+2+3, 1, 2+3, then none (2 alone is below it)
    assert lists[index[1]] == [0] and priority.tolist() == [0, 1]  # a non-finite score: no coupon, last
    # singletons rank exactly as the coupons do
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(50, 4)).astype(np.float32).round(1)
    coupons = ranking(plain, [1, 2, 3])
    alone = bundle_ranking(plain, [(1,), (2,), (3,)])
    assert coupons[0] == alone[0] and coupons[1] == alone[1]
    np.testing.assert_array_equal(coupons[2], alone[2])


def test_a_model_scoring_bundles_gives_their_scores_itself() -> None:
    scores = np.array([[1.0, 3.0, 0.5, 2.0], [0.0, 1.0, 1.0, 1.0]], np.float32)
    bundles = [(1,), (2,), (1, 3), (2, 3), (1, 2, 3)]
    several = np.array([[0.0, 5.0, 2.0], [0.5, np.inf, 0.0]], np.float32)  # 1+3, 2+3, 1+2+3 as the model scores
    np.testing.assert_allclose(bundle_scores(scores[:1], bundles, several[:1]), [[1.0, 3.0, 0.5, 0.0, 5.0, 2.0]])
    lists, index, priority = bundle_ranking(scores, bundles, several)
    # the model's 2+3 first (additive: 1+3 first, 4.0); a row with a non-finite bundle score: no coupon, last
    assert lists[index[0]] == [4, 1, 5, 0] and lists[index[1]] == [0] and priority.tolist() == [0, 1]
    assert bundle_ranking(scores, bundles)[0][0][0] == 3
    with pytest.raises(ValueError, match=r"several: the scores of the 3 bundles of several coupons must be \[2, 3\]"):
        bundle_scores(scores, bundles, several[:, :2])
    # first fit grants by the model's scores: 2+3 (400) where it fits, else what comes next that fits
    prices = np.array([-1, 100, 200, 200])
    granted, refused = first_fit_bundles(scores[:1], bundles, prices, {}, 10_000, several[:1])
    assert granted.tolist() == [4] and not refused.any()
    granted, refused = first_fit_bundles(scores[:1], bundles, prices, {}, 300, several[:1])
    assert granted.tolist() == [1] and refused.all()


def test_first_fit_bundles_takes_budget_and_stock_whole() -> None:
    scores = np.array([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.5], [0.0, 0.2, 0.1, 0.1]])
    bundles = [(1,), (2,), (1, 2), (2, 3)]
    prices = np.array([-1, 100, 300, 200])
    # preferences: rows 0 and 1: 1+2, 2+3, 1, 2 (ties keep the earlier bundle); row 2: 1+2, 1, 2+3, 2
    granted, refused = first_fit_bundles(scores, bundles, prices, {3: 1}, 10_000)
    assert granted.tolist() == [3, 3, 3] and not refused.any()
    granted, refused = first_fit_bundles(scores, bundles, prices, {2: 1}, 10_000)  # one unit of 2
    assert granted.tolist() == [3, 1, 1] and refused.tolist() == [False, True, True]
    granted, refused = first_fit_bundles(scores, bundles, prices, {}, 350)  # 1+2 costs 400: 1 alone, thrice
    assert granted.tolist() == [1, 1, 1] and refused.all()
    granted, _ = first_fit_bundles(scores, bundles, prices, {}, 250)
    assert granted.tolist() == [1, 1, 0]
    # singletons with no stock grant what first_fit grants
    rng = np.random.default_rng(1)
    plain = rng.normal(size=(30, 4)).round(1)
    for budget in (0, 500, 2_000, 100_000):
        alone, _ = first_fit_bundles(plain, [(1,), (2,), (3,)], prices, {}, budget)
        coupons, _ = first_fit(plain, prices, budget)
        np.testing.assert_array_equal(alone, coupons)


def test_dominant_is_the_dearest_coupon() -> None:
    assert dominant([(1, 200), (3, 800), (2, 800)]) == 2
    assert dominant([]) == 0


def test_a_rule_that_allows_too_many_bundles_is_refused_at_once() -> None:
    """Counted class by class, not listed: 1,024 coupons of one class and a rule of 8 is 1,024 bundles of one."""
    same = [{"action": a, "cost": 1.0} for a in range(1, 1025)]
    assert len(Catalog.parse(same, max_per_bundle=8).bundles) == 1024
    own = [{**c, "class": str(c["action"])} for c in same]
    with pytest.raises(CatalogError, match="allows 524800 bundles"):
        Catalog.parse(own, max_per_bundle=2)
    with pytest.raises(CatalogError, match="more than 4096"):
        Catalog.parse(own, max_per_bundle=8)


def test_action_descriptors_describe_what_a_bundle_gives() -> None:
    catalog = Catalog.parse(COUPONS, max_per_bundle=3)  # bundles (1,), (2,), (3,), (1, 2), (1, 3)
    rows = catalog.action_descriptors()
    assert rows.dtype == np.float32 and rows.shape == (6, len(ACTION_FEATURES))
    named = [dict(zip(ACTION_FEATURES, map(float, row), strict=True)) for row in rows]
    assert named[0] == {name: (1.0 if name == "step" else 0.0) for name in ACTION_FEATURES}  # no coupon
    assert named[2] == {
        "step": 1.0,
        "coupons": 1.0,
        "amount_off": 0.0,
        "percent_off": pytest.approx(0.125),
        "percent_cap": 8.0,
        "worst_case": 8.0,
        "largest_worst_case": 8.0,
        "largest_min_spend": 20.0,
        "with_min_spend": 1.0,
    }
    both = named[4]  # coupon 1 (2 off) with coupon 2 (12.5% capped at 8, needing 20)
    assert (both["coupons"], both["amount_off"], both["worst_case"], both["largest_worst_case"]) == (2, 2, 10, 8)
    assert (both["largest_min_spend"], both["with_min_spend"]) == (20.0, 1.0)
    assert named[5]["amount_off"] == 7.0 and named[5]["with_min_spend"] == 0.0


def test_action_rows_the_service_passes_a_model_scoring_by_features() -> None:
    catalog = Catalog.parse(COUPONS, max_per_bundle=3)  # coupons 1, 2, 3; bundles of several (1, 2), (1, 3)
    rows = catalog.action_rows(num_actions=5)
    described = catalog.action_descriptors()
    assert rows.table.shape == (5 + 2, len(ACTION_FEATURES))
    np.testing.assert_array_equal(rows.table[:4], described[:4])  # no coupon, then each coupon alone
    np.testing.assert_array_equal(rows.table[4], described[0])  # action 4 is no coupon of this campaign's
    np.testing.assert_array_equal(rows.table[5:], described[4:])  # the bundles of several coupons
    decided = np.array([0, 3, 1_000_004, 1_000_005, 1_000_009, 2])
    np.testing.assert_array_equal(rows.rows(decided), [0, 3, 5, 6, 0, 2])  # a bundle not in the catalog: row 0


@pytest.mark.parametrize("max_per_bundle", [None, 2])
def test_a_catalog_read_back_from_its_campaign_view(max_per_bundle: int | None) -> None:
    catalog = Catalog.parse(COUPONS, max_per_bundle=max_per_bundle)
    view = {"coupons": [{**c.public(), "stock_left": 3} for c in catalog.coupons], **catalog.public()}
    again = Catalog.from_view(view)
    assert again.coupons == catalog.coupons
    assert [b.coupons for b in again.bundles] == [b.coupons for b in catalog.bundles]
    assert again.action_rows(5).table.tolist() == catalog.action_rows(5).table.tolist()
    plain = Catalog.from_view({"coupons": [{"action": 1, "cost": 2.0}, {"action": 3, "cost": 5.0}]})
    assert plain == Catalog.of_costs({1: 200, 3: 500})
    with pytest.raises(CatalogError, match=r"coupons\.0\.cap"):
        Catalog.from_view({"coupons": [{"action": 1, "kind": "percent", "value": 10.0, "cap": None, "cost": 1.0}]})
