"""The Hillstrom e-mail campaign (MineThatData 2008) as SACO logs, and a sequential world fitted on it.

Mapping (the one used by `saco report`, documented in docs/report.md):

- action: 0 = no e-mail, 1 = men's e-mail, 2 = women's e-mail (the randomised arm, P = 1/3 each).
- reward: `spend` in dollars over the two weeks after the campaign (revenue, as the paper's "is paid").
- cost: `EMAIL_COST` (= 1.0) for every *visit* of a customer who was sent an e-mail, 0 otherwise. The
  campaign pays per response (a cost-per-visit deal, like a coupon that only costs when it is redeemed),
  so cost is uncertain, user dependent and must be learned, exactly as in the coupon setting; a flat
  per-send cost would turn the budget into a plain count of e-mails and leave nothing to learn about cost.
- features f0..f10: standardised recency, standardised log(1 + history), mens, womens, newbie, one-hot
  zip_code (Surburban, Rural, Urban) and one-hot channel (Phone, Web, Multichannel). history_segment is
  a binning of history and is left out.
- one row per customer, t = 0 (T = 1: the single-round case).

The file is read from (first that applies): an explicit path, $SACO_HILLSTROM, or
<repo root>/../shared/data/hillstrom.csv. Nothing is ever downloaded.

`HillstromWorld` is the synthetic sequential world (research/world.py) with three actions (none / mens /
womens) whose purchase event is a visit: the base logit, the per-arm lifts and the basket are solved so
that, at the first round, the visit rate of every arm and the mean spend match the measured Hillstrom
means; the carry-over effects (habit, fatigue, reference) are the world's defaults (simulated, not fitted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from offline.logs import Logs, logs_table, validate_table
from research.world import SyntheticWorld, UserPopulation, WorldConfig

EMAIL_COST = 1.0
ARMS = ("No E-Mail", "Mens E-Mail", "Womens E-Mail")
ZIPS = ("Surburban", "Rural", "Urban")
CHANNELS = ("Phone", "Web", "Multichannel")
FEATURES = (
    "recency_z",
    "log_history_z",
    "mens",
    "womens",
    "newbie",
    *(f"zip_{z.lower()}" for z in ZIPS),
    *(f"channel_{c.lower()}" for c in CHANNELS),
)
PROPENSITY = 1.0 / 3.0  # randomised campaign: each arm with probability 1/3


class HillstromError(ValueError):
    """The Hillstrom file is missing or malformed (one line, the CLI prints it)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_path(path: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        candidate = Path(path)
    elif os.environ.get("SACO_HILLSTROM"):
        candidate = Path(os.environ["SACO_HILLSTROM"])
    else:
        candidate = repo_root().parent / "shared" / "data" / "hillstrom.csv"
    if not candidate.is_file():
        raise HillstromError(
            f"Hillstrom data not found at {candidate}: pass --hillstrom PATH or set SACO_HILLSTROM "
            "(it is never downloaded)"
        )
    return candidate


@dataclass(frozen=True)
class HillstromData:
    features: np.ndarray  # [n, 11] float32
    arm: np.ndarray  # [n] 0 none / 1 mens / 2 womens
    visit: np.ndarray  # [n] 0/1
    conversion: np.ndarray  # [n] 0/1
    spend: np.ndarray  # [n] dollars
    path: Path

    @property
    def n(self) -> int:
        return int(self.arm.shape[0])

    @property
    def reward(self) -> np.ndarray:
        return self.spend

    @property
    def cost(self) -> np.ndarray:
        return EMAIL_COST * self.visit * (self.arm > 0)

    def arm_means(self) -> dict[str, list[float]]:
        """Per arm (none, mens, womens): visit rate, conversion rate, mean spend."""
        out: dict[str, list[float]] = {"visit": [], "conversion": [], "spend": []}
        for a in range(3):
            sel = self.arm == a
            out["visit"].append(float(self.visit[sel].mean()))
            out["conversion"].append(float(self.conversion[sel].mean()))
            out["spend"].append(float(self.spend[sel].mean()))
        return out


def load_hillstrom(path: str | os.PathLike[str] | None = None) -> HillstromData:
    p = resolve_path(path)
    try:
        table = pacsv.read_csv(str(p))
    except Exception as exc:
        raise HillstromError(f"cannot read Hillstrom data {p}: {str(exc).splitlines()[0]}") from exc
    need = (
        "recency",
        "history",
        "mens",
        "womens",
        "zip_code",
        "newbie",
        "channel",
        "segment",
        "visit",
        "conversion",
        "spend",
    )
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise HillstromError(f"Hillstrom data {p} lacks column {missing[0]!r}")

    def col(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_pylist())

    segment = col("segment")
    arm = np.full(len(segment), -1, dtype=np.int64)
    for a, name in enumerate(ARMS):
        arm[segment == name] = a
    if (arm < 0).any():
        raise HillstromError(
            f"Hillstrom data {p}: unknown segment {segment[arm < 0][0]!r} at row {int(np.flatnonzero(arm < 0)[0]) + 1}"
        )
    recency = col("recency").astype(np.float64)
    log_hist = np.log1p(col("history").astype(np.float64))
    zips, channels = col("zip_code"), col("channel")
    feats = [
        (recency - recency.mean()) / recency.std(),
        (log_hist - log_hist.mean()) / log_hist.std(),
        col("mens").astype(np.float64),
        col("womens").astype(np.float64),
        col("newbie").astype(np.float64),
        *((zips == z).astype(np.float64) for z in ZIPS),
        *((channels == c).astype(np.float64) for c in CHANNELS),
    ]
    return HillstromData(
        features=np.stack(feats, axis=1).astype(np.float32),
        arm=arm,
        visit=col("visit").astype(np.float64),
        conversion=col("conversion").astype(np.float64),
        spend=col("spend").astype(np.float64),
        path=p,
    )


def split(
    data: HillstromData, rows: int | None, seed: int, train_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint train / held-out row indices (optionally of a random subsample of `rows` rows)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(data.n)
    if rows is not None:
        perm = perm[: min(rows, data.n)]
    cut = int(len(perm) * train_fraction)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def to_logs(data: HillstromData, rows: np.ndarray) -> Logs:
    """SACO logs (the log schema of README.md) of the given rows: one row per customer, t = 0."""
    table = logs_table(
        np.char.add("h", rows.astype(str)),
        np.zeros(len(rows), dtype=np.int64),
        data.arm[rows],
        data.cost[rows],
        data.reward[rows],
        data.features[rows],
    )
    return validate_table(table)


def ips_estimate(actions: np.ndarray, data: HillstromData, rows: np.ndarray) -> tuple[float, float]:
    """Unbiased inverse-propensity estimate of (total revenue, total cost) of deterministic `actions`
    [len(rows)] on the held-out `rows`: sum over rows of 1[a_i = arm_i] * y_i / (1/3)."""
    match = (np.asarray(actions) == data.arm[rows]).astype(np.float64) / PROPENSITY
    return float((match * data.reward[rows]).sum()), float((match * data.cost[rows]).sum())


# ---- a sequential world with Hillstrom's marginals ---------------------------------------------------------
class HillstromWorld(SyntheticWorld):
    """SyntheticWorld with 3 actions (none / mens / womens, cost EMAIL_COST per visit of an e-mailed user),
    a shifted base logit, per-arm lifts and a scaled basket (see `fit_hillstrom_world`)."""

    def __init__(self, config: WorldConfig, base_shift: float, lifts: tuple[float, float], basket_scale: float) -> None:
        super().__init__(config)
        self.base_shift, self.basket_scale = base_shift, basket_scale
        self.lift = np.array([0.0, *lifts])

    def sample_users(self, n: int, seed: int) -> UserPopulation:
        u = super().sample_users(n, seed)
        return replace(u, base=u.base + self.base_shift, basket=u.basket * self.basket_scale)


def hillstrom_world_config(users: int, rounds: int, seed: int, effects: bool = True) -> WorldConfig:
    cfg = WorldConfig(users=users, rounds=rounds, seed=seed, coupon_values=(0.0, EMAIL_COST, EMAIL_COST))
    return cfg if effects else cfg.myopic()


def _first_round_rates(world: HillstromWorld, n: int) -> tuple[np.ndarray, float]:
    ep = world.start(n, 4_242)
    p = world.purchase_probability(ep)
    return p.mean(0), float((p[:, 0] * ep.users.basket).mean() / p[:, 0].mean())


def fit_hillstrom_world(means: dict[str, list[float]], cfg: WorldConfig, n: int = 20_000) -> HillstromWorld:
    """Solve base shift, lifts and basket so that the first-round visit rate of each arm and the overall
    spend per visit match `means` (from `HillstromData.arm_means`). Bisection, one unknown at a time."""
    visit = np.asarray(means["visit"])
    spend = np.asarray(means["spend"])
    spend_per_visit = float(spend.sum() / visit.sum())

    def solve(f, lo: float, hi: float) -> float:  # increasing f, root of f = 0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    shift = solve(lambda s: _first_round_rates(HillstromWorld(cfg, s, (0.0, 0.0), 1.0), n)[0][0] - visit[0], -8.0, 4.0)
    lifts = []
    for a in (1, 2):
        lifts.append(
            solve(
                lambda v, a=a: _first_round_rates(HillstromWorld(cfg, shift, (v, v), 1.0), n)[0][a] - visit[a], 0.0, 6.0
            )
        )
    _, basket = _first_round_rates(HillstromWorld(cfg, shift, (lifts[0], lifts[1]), 1.0), n)
    return HillstromWorld(cfg, shift, (lifts[0], lifts[1]), spend_per_visit / basket)


def world_marginals(world: HillstromWorld, n: int = 20_000) -> dict[str, list[float]]:
    """First-round visit rate and mean spend per arm of a fitted world (to check against the data)."""
    ep = world.start(n, 4_242)
    p = world.purchase_probability(ep)
    return {
        "visit": [float(v) for v in p.mean(0)],
        "spend": [float((p[:, a] * ep.users.basket).mean()) for a in range(p.shape[1])],
    }
