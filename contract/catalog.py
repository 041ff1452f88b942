"""A campaign's coupon catalog: its coupons (a fixed amount, or a percentage with a cap; an optional minimum
spend and stock) and the bundles a decision may grant. The one definition of the format and its rules, read
by the service (campaign settings, the ledger's bundle and stock tables) and by learning (coupon features).

The public form (the admin API's campaign body, docs/api.md "Coupon catalog"; money in currency units)::

    coupons         [{"action": 1, "cost": 2.0},                             today's form: a fixed amount
                     {"action": 2, "kind": "amount", "value": 5.0, "min_spend": 30.0, "stock": 500},
                     {"action": 3, "kind": "percent", "value": 10.0, "cap": 8.0, "class": "basket"}]
    bundles         [[1], [2], [1, 3]]   optional: the allowed bundles, each a list of coupon actions
    max_per_bundle  2                    optional: the largest bundle

- `action`: 1..MAX_ACTION, each coupon once; it is also the model's action of the coupon.
- `kind`: "amount" (default) or "percent". An amount coupon gives `value` off (money > 0; `cost` is the
  same thing in today's form, and a coupon gives one of the two); a percent coupon gives `value` percent
  off (0 < value <= 100, two decimals), at most `cap` (money > 0, required: what the coupon can cost at
  worst, which strict mode reserves). `cap` belongs to percent coupons only.
- `min_spend`: money >= 0, the basket the coupon needs (a feature of the coupon: the ledger reserves the
  worst case whatever it is).
- `stock`: integer >= 0, units the campaign may grant; a unit is held from the grant until the outcome and
  returns when the outcome reports the coupon unused (cost 0) or its reservation expires.
- `class`: text, for the bundle rule (default: the coupon's kind).
- Bundles: "no coupon" (the empty bundle) is always allowed and never listed. Without `bundles` and
  `max_per_bundle`, every coupon alone (today's answer). With `bundles`, exactly those: none empty, each
  naming catalog coupons, none twice in one bundle, no bundle twice, none larger than `max_per_bundle`
  when given. With `max_per_bundle` alone, the rule: every set of at most that many coupons with at most
  one coupon per class, ordered by size, then by actions (at most MAX_BUNDLES bundles).
- A decision's `action`: no coupon 0; a one-coupon bundle its coupon's action; a bundle of several
  coupons BUNDLE_ACTIONS + its position (1-based) in the catalog's bundle list (above every coupon action).

Inside, money is integer cents and a percentage integer hundredths of a percent (basis points). A catalog
that says nothing beyond today's form (amount coupons without minimum spend, stock or class, no bundle
settings) is `plain`: such a campaign is stored and served exactly as a campaign without a catalog.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from contract.money import to_cents

AMOUNT, PERCENT = "amount", "percent"
KINDS = (AMOUNT, PERCENT)
MAX_ACTION = 10**6  # the largest coupon action
BUNDLE_ACTIONS = MAX_ACTION  # a bundle of several coupons answers BUNDLE_ACTIONS + its position (1-based)
MAX_COUPONS = 1024
MAX_BUNDLES = 4096
MAX_PER_BUNDLE = 8
MAX_STOCK = 10**12  # exact in the doubles of Redis's Lua scripts
MAX_CLASS_CHARS = 64
PERCENT_UNITS = 100  # a percentage is kept in hundredths of a percent
FIELDS = ("action", "cost", "kind", "value", "cap", "min_spend", "stock", "class")

Loc = tuple[str | int, ...]


class CatalogError(ValueError):
    """A catalog that breaks a rule; `loc` names the field (("coupons", 2, "cap"), ("bundles", 0, 1), ...)."""

    def __init__(self, loc: Loc, msg: str, value: Any = None) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg
        self.value = value


@dataclass(frozen=True)
class Coupon:
    """One coupon; money in cents, a percentage in hundredths of a percent."""

    action: int
    value: int  # amount: cents off; percent: hundredths of a percent off
    kind: str = AMOUNT
    cap: int | None = None  # percent: the most it gives off, cents
    min_spend: int | None = None  # cents
    stock: int | None = None  # units the campaign may grant (None: no limit)
    group: str | None = None  # the class of the bundle rule (None: its kind)

    @property
    def worst_case(self) -> int:
        """The most the coupon can cost, cents: what strict mode reserves and the ceiling of its settlement."""
        return self.value if self.kind == AMOUNT else int(self.cap or 0)

    @property
    def klass(self) -> str:
        return self.group if self.group is not None else self.kind

    @property
    def plain(self) -> bool:
        """Today's coupon: a fixed amount, nothing more."""
        return self.kind == AMOUNT and self.min_spend is None and self.stock is None and self.group is None

    def to_json(self) -> dict[str, Any]:
        """The stored form (integers: cents and hundredths of a percent)."""
        return {
            "action": self.action,
            "kind": self.kind,
            "value": self.value,
            "cap": self.cap,
            "min_spend": self.min_spend,
            "stock": self.stock,
            "class": self.group,
        }

    def public(self) -> dict[str, Any]:
        """The public form (currency units and percent), as the campaign view shows it."""
        return {
            "action": self.action,
            "kind": self.kind,
            "value": self.value / (100 if self.kind == AMOUNT else PERCENT_UNITS),
            "cap": None if self.cap is None else self.cap / 100,
            "min_spend": None if self.min_spend is None else self.min_spend / 100,
            "stock": self.stock,
            "class": self.group,
            "cost": self.worst_case / 100,
        }


@dataclass(frozen=True)
class Bundle:
    """An allowed bundle: what a decision granting it answers (`action`) and its coupons (ascending)."""

    action: int
    coupons: tuple[int, ...]

    @property
    def key(self) -> str:
        """The bundle's name in the ledger: its actions joined by '+' ("1+3")."""
        return "+".join(map(str, self.coupons))


@dataclass(frozen=True)
class CouponFeatures:
    """The catalog's coupons as model features, one entry per coupon in catalog order."""

    actions: np.ndarray  # i64 [N]
    kind: np.ndarray  # i64 [N]: KINDS.index(kind), 0 amount, 1 percent
    value: np.ndarray  # f64 [N]: amount in currency units; percent as a fraction (0.1 = 10%)
    cap: np.ndarray  # f64 [N]: currency units, 0 for an amount coupon
    min_spend: np.ndarray  # f64 [N]: currency units, 0 when none
    worst_case: np.ndarray  # f64 [N]: currency units


# The descriptor of a decision's bundle that a model scoring by features reads (`action_descriptors`), one
# number each, money in currency units and a percentage as a fraction (0.1 = 10%):
ACTION_FEATURES = (
    "step",  # 1 for every decision, no coupon included (a row of zeros is "no step": padding)
    "coupons",  # how many coupons the bundle holds
    "amount_off",  # the sum of its amount coupons' values
    "percent_off",  # the sum of its percent coupons' percentages
    "percent_cap",  # the sum of its percent coupons' caps
    "worst_case",  # the sum of its coupons' worst cases (what strict mode reserves)
    "largest_worst_case",  # its dearest coupon's worst case
    "largest_min_spend",  # the largest minimum spend among its coupons (0: none needs one)
    "with_min_spend",  # how many of its coupons need a minimum spend
)


def action_descriptors(coupons: Sequence[Coupon], bundles: Sequence[Sequence[int]]) -> np.ndarray:
    """[1 + len(bundles), len(ACTION_FEATURES)] float32: row 0 no coupon, row j the (j-1)-th bundle (a list of
    coupon actions of `coupons`). The one description of a decision by what it gives, so that a model scoring
    by it reads a coupon or bundle it never saw as it reads the others; training and serving both build it
    here."""
    by_action = {c.action: c for c in coupons}
    rows = np.zeros((1 + len(bundles), len(ACTION_FEATURES)), np.float64)
    rows[:, 0] = 1.0
    for j, bundle in enumerate(bundles, 1):
        parts = [by_action[a] for a in bundle]
        worst = [c.worst_case / 100 for c in parts]
        rows[j, 1] = len(parts)
        rows[j, 2] = sum(c.value / 100 for c in parts if c.kind == AMOUNT)
        rows[j, 3] = sum(c.value / (100 * PERCENT_UNITS) for c in parts if c.kind == PERCENT)
        rows[j, 4] = sum((c.cap or 0) / 100 for c in parts if c.kind == PERCENT)
        rows[j, 5] = sum(worst)
        rows[j, 6] = max(worst, default=0.0)
        rows[j, 7] = max(((c.min_spend or 0) / 100 for c in parts), default=0.0)
        rows[j, 8] = sum(1 for c in parts if c.min_spend)
    return rows.astype(np.float32)


@dataclass(frozen=True)
class ActionRows:
    """A campaign's decisions as the rows of an action table, for a model scoring by features: row a < K
    (the model's num_actions) is coupon a alone (a row that is not one of the campaign's coupons reads as no
    coupon and is never offered); row K + j the j-th bundle of several coupons in the catalog's order. What the
    service passes the model (`table`) and how a decision's action in a user's context becomes its row
    (`rows`), written once for serving and for training from the service's logs."""

    table: np.ndarray  # f32 [K + len(several), len(ACTION_FEATURES)]
    num_actions: int  # K
    several: tuple[Bundle, ...]  # the bundles of several coupons, rows K, K + 1, ...

    def rows(self, actions: np.ndarray) -> np.ndarray:
        """i64: each decision action's row: a coupon action (< K) itself; a bundle of several coupons (its
        action BUNDLE_ACTIONS + position) its row; any other action (a bundle no longer in the catalog) row 0,
        read as no coupon."""
        actions = np.asarray(actions, np.int64)
        out = np.where((actions >= 0) & (actions < self.num_actions), actions, 0)
        position = actions - BUNDLE_ACTIONS
        bundled = (position >= 1) & (position < len(self._bundle_rows))
        out[bundled] = self._bundle_rows[position[bundled]]
        return out

    @cached_property
    def _bundle_rows(self) -> np.ndarray:
        """i64 [1 + the largest position]: the row of the bundle answered as BUNDLE_ACTIONS + position (0: none)."""
        rows = np.zeros(1 + max((b.action - BUNDLE_ACTIONS for b in self.several), default=0), np.int64)
        for j, bundle in enumerate(self.several):
            rows[bundle.action - BUNDLE_ACTIONS] = self.num_actions + j
        return rows


@dataclass(frozen=True)
class Catalog:
    """Validated coupons and the allowed bundles (every one, singletons included, in their order)."""

    coupons: tuple[Coupon, ...]
    bundles: tuple[Bundle, ...]
    listed: tuple[tuple[int, ...], ...] | None = None  # the bundles as given (None: by rule or singletons)
    max_per_bundle: int | None = None

    @staticmethod
    def build(
        coupons: Sequence[Coupon],
        bundles: Sequence[Sequence[int]] | None = None,
        max_per_bundle: int | None = None,
    ) -> Catalog:
        """The catalog of these coupons and bundle settings; CatalogError naming the field that breaks a rule."""
        _check_coupons(coupons)
        if max_per_bundle is not None and not (
            isinstance(max_per_bundle, int) and 1 <= max_per_bundle <= MAX_PER_BUNDLE
        ):
            raise CatalogError(("max_per_bundle",), f"must be an integer within 1..{MAX_PER_BUNDLE}", max_per_bundle)
        by_action = {c.action: c for c in coupons}
        if bundles is not None:
            sets = _check_bundles(bundles, by_action, max_per_bundle)
            listed: tuple[tuple[int, ...], ...] | None = tuple(sets)
        elif max_per_bundle is not None:
            sets = _by_rule(sorted(coupons, key=lambda c: c.action), max_per_bundle)
            listed = None
        else:
            sets = [(c.action,) for c in sorted(coupons, key=lambda c: c.action)]
            listed = None
        allowed = tuple(
            Bundle(s[0] if len(s) == 1 else BUNDLE_ACTIONS + position, s) for position, s in enumerate(sets, 1)
        )
        return Catalog(tuple(coupons), allowed, listed, max_per_bundle)

    @staticmethod
    def parse(
        coupons: Sequence[Mapping[str, Any]],
        bundles: Sequence[Sequence[int]] | None = None,
        max_per_bundle: int | None = None,
    ) -> Catalog:
        """The catalog of its public form (module docstring)."""
        if not isinstance(coupons, Sequence) or isinstance(coupons, str):
            raise CatalogError(("coupons",), "must be a list of coupons", coupons)
        return Catalog.build([parse_coupon(c, i) for i, c in enumerate(coupons)], bundles, max_per_bundle)

    @staticmethod
    def from_view(view: Mapping[str, Any]) -> Catalog:
        """The catalog of a campaign view (GET /v1/admin/campaigns/{id}: `coupons`, and a catalog campaign's
        `bundles` and `max_per_bundle`), as `public` and `Coupon.public` render it; CatalogError naming the
        field that breaks a rule."""
        coupons = view.get("coupons")
        if not isinstance(coupons, Sequence) or isinstance(coupons, str):
            raise CatalogError(("coupons",), "must be a list of coupons", coupons)
        parsed = []
        for i, c in enumerate(coupons):
            if not isinstance(c, Mapping):
                raise CatalogError(("coupons", i), "must be an object", c)
            if "value" in c:  # a catalog coupon: `cost` is its worst case, `stock_left` the view's own
                c = {k: v for k, v in c.items() if k not in ("cost", "stock_left") and v is not None}
            parsed.append(parse_coupon(c, i))
        listed = view.get("bundles")
        bundles = None if listed is None else [list(b.get("coupons", [])) for b in listed]
        if bundles is not None and all(len(b) == 1 for b in bundles) and view.get("max_per_bundle") is None:
            bundles = None  # each coupon alone
        return Catalog.build(parsed, bundles, view.get("max_per_bundle"))

    @staticmethod
    def of_costs(costs: Mapping[int, int]) -> Catalog:
        """Today's campaign: an amount coupon of each cost (cents), each alone."""
        return Catalog.build([Coupon(action, cents) for action, cents in sorted(costs.items())])

    @property
    def plain(self) -> bool:
        """Nothing beyond today's form: stored and served as a campaign without a catalog."""
        return self.listed is None and self.max_per_bundle is None and all(c.plain for c in self.coupons)

    @cached_property
    def by_action(self) -> dict[int, Coupon]:
        return {c.action: c for c in self.coupons}

    @cached_property
    def costs(self) -> dict[int, int]:
        """Action -> the coupon's worst case in cents (what today's `coupons` table holds)."""
        return {c.action: c.worst_case for c in sorted(self.coupons, key=lambda c: c.action)}

    @cached_property
    def by_key(self) -> dict[str, Bundle]:
        return {b.key: b for b in self.bundles}

    def bundle_cost(self, bundle: Bundle) -> int:
        """A bundle's worst case, cents: the sum of its coupons' (what strict mode reserves)."""
        return sum(self.by_action[a].worst_case for a in bundle.coupons)

    @cached_property
    def stock(self) -> dict[int, int]:
        """Action -> units, for the coupons with a stock."""
        return {c.action: c.stock for c in self.coupons if c.stock is not None}

    def ledger_bundles(self) -> str:
        """The bundle table the reservation reads (service/lua/reserve.lua): JSON {key: [action, coupons...]}."""
        return json.dumps({b.key: [b.action, *b.coupons] for b in self.bundles}, separators=(",", ":"))

    def ledger_stock(self) -> str:
        """The stock table the reservation reads: JSON {action: units}."""
        return json.dumps({str(a): units for a, units in sorted(self.stock.items())}, separators=(",", ":"))

    def to_json(self) -> str:
        """The stored form (integers); `from_json` reads it back."""
        return json.dumps(
            {
                "coupons": [c.to_json() for c in self.coupons],
                "bundles": None if self.listed is None else [list(b) for b in self.listed],
                "max_per_bundle": self.max_per_bundle,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str | bytes) -> Catalog:
        stored = json.loads(text)
        coupons = [
            Coupon(
                action=c["action"],
                value=c["value"],
                kind=c["kind"],
                cap=c["cap"],
                min_spend=c["min_spend"],
                stock=c["stock"],
                group=c["class"],
            )
            for c in stored["coupons"]
        ]
        return Catalog.build(coupons, stored["bundles"], stored["max_per_bundle"])

    def features(self) -> CouponFeatures:
        """The coupons' features as arrays (catalog order): what a model that scores coupons by their
        features reads, so that a coupon it never saw can be scored."""
        percent = np.array([c.kind == PERCENT for c in self.coupons], np.bool_)
        value = np.array([c.value for c in self.coupons], np.float64)
        return CouponFeatures(
            actions=np.array([c.action for c in self.coupons], np.int64),
            kind=percent.astype(np.int64),
            value=np.where(percent, value / (100 * PERCENT_UNITS), value / 100),
            cap=np.array([c.cap or 0 for c in self.coupons], np.float64) / 100,
            min_spend=np.array([c.min_spend or 0 for c in self.coupons], np.float64) / 100,
            worst_case=np.array([c.worst_case for c in self.coupons], np.float64) / 100,
        )

    def action_descriptors(self) -> np.ndarray:
        """`action_descriptors` of the allowed bundles: row 0 no coupon, row j `bundles[j - 1]` (the bundle
        world's action j)."""
        return action_descriptors(self.coupons, [b.coupons for b in self.bundles])

    def dominant(self, bundle: Bundle) -> int:
        """The coupon that stands for `bundle` where one action must (`dominant` of its coupons' worst cases)."""
        return dominant([(a, self.by_action[a].worst_case) for a in bundle.coupons])

    def action_rows(self, num_actions: int) -> ActionRows:
        """`ActionRows` of this catalog for a model of `num_actions` (every coupon action below it)."""
        several = tuple(b for b in self.bundles if len(b.coupons) > 1)
        alone = [(a,) if a in self.by_action else () for a in range(1, num_actions)]
        return ActionRows(action_descriptors(self.coupons, alone + [b.coupons for b in several]), num_actions, several)

    def membership(self, num_actions: int) -> np.ndarray:
        """[num_actions, len(bundles)] float32: 1 where the bundle holds the action."""
        matrix = np.zeros((num_actions, len(self.bundles)), np.float32)
        for j, bundle in enumerate(self.bundles):
            for a in bundle.coupons:
                if a < num_actions:
                    matrix[a, j] = 1
        return matrix

    def public(self) -> dict[str, Any]:
        """The campaign view's catalog fields."""
        return {
            "bundles": [
                {"action": b.action, "coupons": list(b.coupons), "cost": self.bundle_cost(b) / 100}
                for b in self.bundles
            ],
            "max_per_bundle": self.max_per_bundle,
        }


def dominant(components: Sequence[tuple[int, float]]) -> int:
    """The coupon that stands for a bundle where one action must (a model that scores single coupons; the
    action of a decision's step in its user's context): the dearest of (action, worst-case cost) pairs, ties
    to the lower action; 0 for no coupon."""
    if not components:
        return 0
    return min(components, key=lambda part: (-part[1], part[0]))[0]


def parse_coupon(raw: Mapping[str, Any], i: int) -> Coupon:
    """One coupon of the public form (module docstring); CatalogError naming ("coupons", i, field)."""
    if not isinstance(raw, Mapping):
        raise CatalogError(("coupons", i), "must be an object", raw)
    for name in raw:
        if name not in FIELDS:
            raise CatalogError(("coupons", i, name), f"is not a coupon field (fields: {', '.join(FIELDS)})")
    action = raw.get("action")
    if isinstance(action, bool) or not isinstance(action, int) or not 1 <= action <= MAX_ACTION:
        raise CatalogError(("coupons", i, "action"), f"must be an integer within 1..{MAX_ACTION}", action)
    kind = raw.get("kind", AMOUNT)
    if kind not in KINDS:
        raise CatalogError(("coupons", i, "kind"), f"must be one of {', '.join(KINDS)}", kind)
    given = raw.get("value") is not None, raw.get("cost") is not None
    if given == (True, True):
        raise CatalogError(("coupons", i, "cost"), "give `value` or `cost` (today's form of an amount), not both")
    if not any(given):
        raise CatalogError(("coupons", i, "value"), "is required (the amount off, or the percent off)")
    if given[1] and kind != AMOUNT:
        raise CatalogError(("coupons", i, "cost"), "is an amount coupon's value: a percent coupon gives `value`")
    name = "value" if given[0] else "cost"
    if kind == AMOUNT:
        value = _money(raw[name], ("coupons", i, name), positive=True)
    else:
        value = _hundredths(raw[name], ("coupons", i, name), "a percentage")
        if not 0 < value <= 100 * PERCENT_UNITS:
            raise CatalogError(("coupons", i, name), "must be a percentage above 0 and at most 100", raw[name])
    cap = raw.get("cap")
    cap_cents = None if cap is None else _money(cap, ("coupons", i, "cap"), positive=True)
    min_spend = raw.get("min_spend")
    stock = raw.get("stock")
    if stock is not None and (isinstance(stock, bool) or not isinstance(stock, int) or not 0 <= stock <= MAX_STOCK):
        raise CatalogError(("coupons", i, "stock"), f"must be an integer within 0..{MAX_STOCK}", stock)
    group = raw.get("class")
    if group is not None and (not isinstance(group, str) or not 1 <= len(group) <= MAX_CLASS_CHARS):
        raise CatalogError(("coupons", i, "class"), f"must be text of 1..{MAX_CLASS_CHARS} characters", group)
    return Coupon(
        action=action,
        value=value,
        kind=kind,
        cap=cap_cents,
        min_spend=None if min_spend is None else _money(min_spend, ("coupons", i, "min_spend"), positive=False),
        stock=stock,
        group=group,
    )


def _hundredths(raw: Any, loc: Loc, what: str) -> int:
    """A number of currency units or percent, two decimals at most, in hundredths (cents, basis points)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise CatalogError(loc, f"must be a number ({what})", raw)
    try:
        return to_cents(float(raw))
    except ValueError as exc:
        raise CatalogError(loc, str(exc), raw) from None


def _money(raw: Any, loc: Loc, *, positive: bool) -> int:
    cents = _hundredths(raw, loc, "money")
    if cents < 0 or (positive and cents == 0):
        raise CatalogError(loc, "must be above 0" if positive else "must not be negative", raw)
    return cents


def _check_coupons(coupons: Sequence[Coupon]) -> None:
    if len(coupons) > MAX_COUPONS:
        raise CatalogError(("coupons",), f"at most {MAX_COUPONS} coupons", len(coupons))
    seen: dict[int, int] = {}
    for i, c in enumerate(coupons):
        where = ("coupons", i)
        if not 1 <= c.action <= MAX_ACTION:
            raise CatalogError((*where, "action"), f"must be within 1..{MAX_ACTION}", c.action)
        if c.action in seen:
            raise CatalogError((*where, "action"), f"action {c.action} is listed twice (coupons[{seen[c.action]}])")
        seen[c.action] = i
        if c.kind not in KINDS:
            raise CatalogError((*where, "kind"), f"must be one of {', '.join(KINDS)}", c.kind)
        if c.value <= 0:
            raise CatalogError((*where, "value"), "must be above 0", c.value)
        if c.kind == PERCENT:
            if c.value > 100 * PERCENT_UNITS:
                raise CatalogError((*where, "value"), "a percentage of at most 100", c.value / PERCENT_UNITS)
            if c.cap is None:
                raise CatalogError(
                    (*where, "cap"), "a percent coupon needs a cap (the most it gives off: what strict mode reserves)"
                )
        if c.cap is not None:
            if c.kind != PERCENT:
                raise CatalogError((*where, "cap"), "belongs to percent coupons only (an amount costs its value)")
            if c.cap <= 0:
                raise CatalogError((*where, "cap"), "must be above 0", c.cap / 100)
        if c.min_spend is not None and c.min_spend < 0:
            raise CatalogError((*where, "min_spend"), "must not be negative", c.min_spend / 100)
        if c.stock is not None and not 0 <= c.stock <= MAX_STOCK:
            raise CatalogError((*where, "stock"), f"must be within 0..{MAX_STOCK}", c.stock)


def _check_bundles(
    bundles: Sequence[Sequence[int]], by_action: Mapping[int, Coupon], max_per_bundle: int | None
) -> list[tuple[int, ...]]:
    if len(bundles) > MAX_BUNDLES:
        raise CatalogError(("bundles",), f"at most {MAX_BUNDLES} bundles", len(bundles))
    largest = max_per_bundle or MAX_PER_BUNDLE
    seen: dict[tuple[int, ...], int] = {}
    sets = []
    for i, bundle in enumerate(bundles):
        if not bundle:
            raise CatalogError(("bundles", i), "is empty: no coupon (the empty bundle) is always allowed, unlisted")
        if len(bundle) > largest:
            stated = "max_per_bundle" if max_per_bundle is not None else "the largest bundle"
            raise CatalogError(("bundles", i), f"has {len(bundle)} coupons, more than {stated} ({largest})")
        for j, action in enumerate(bundle):
            if action not in by_action:
                raise CatalogError(("bundles", i, j), f"coupon action {action} is not in the catalog's coupons", action)
            if action in bundle[:j]:
                raise CatalogError(("bundles", i, j), f"coupon action {action} is listed twice in this bundle", action)
        canonical = tuple(sorted(bundle))
        if canonical in seen:
            raise CatalogError(("bundles", i), f"is the same bundle as bundles[{seen[canonical]}]", list(bundle))
        seen[canonical] = i
        sets.append(canonical)
    return sets


def _by_rule(coupons: Sequence[Coupon], max_per_bundle: int) -> list[tuple[int, ...]]:
    """Every set of at most `max_per_bundle` coupons with at most one per class: by size, then actions. Counted
    before it is listed (class by class), so that a rule allowing too many is refused at once."""
    classes: dict[str, list[int]] = {}
    for c in coupons:
        classes.setdefault(c.klass, []).append(c.action)
    ways = [1] + [0] * max_per_bundle  # ways[k]: the bundles of k coupons from the classes seen so far
    for members in classes.values():
        for k in range(max_per_bundle, 0, -1):
            ways[k] += ways[k - 1] * len(members)
    if sum(ways[1:]) > MAX_BUNDLES:
        raise CatalogError(
            ("max_per_bundle",),
            f"the rule allows {sum(ways[1:])} bundles of these coupons, more than {MAX_BUNDLES}; list them in "
            "`bundles`",
            max_per_bundle,
        )
    sets: list[tuple[int, ...]] = []
    for size in range(1, min(max_per_bundle, len(classes)) + 1):
        for chosen in itertools.combinations(classes.values(), size):
            sets.extend(tuple(sorted(picked)) for picked in itertools.product(*chosen))
    return sorted(sets, key=lambda s: (len(s), s))
