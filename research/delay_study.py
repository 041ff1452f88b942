"""What delayed outcomes do to training labels: the naive treatment against the maturity window and the
delay model (`loop.data`), on the synthetic world with a simulated delay distribution.

Decisions of the world's users are spread over `rounds` rounds `round_days` apart; each purchase's
outcome arrives after an exponential (or log-normal) delay. At `now` (one round after the last decision)
some outcomes have not arrived. Each treatment labels the decisions known at `now`; a response model
(expected revenue and spend of every coupon given the features) is fitted on each labelling and on the
full truth (every outcome, however late), and all predict for the same population. The bias of a
treatment is its predicted revenue (response) and spend relative to the truth model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from loop.data import DAY_MS, DelayConfig, label_outcomes
from offline.logs import logs_table
from offline.response import ResponseConfig, ResponseModel
from research.simulate import simulate_logs
from research.world import WorldConfig


@dataclass(frozen=True)
class DelayStudy:
    users: int = 3000
    rounds: int = 10
    round_days: float = 3.0
    delay_mean_days: float = 3.0
    delay_shape: str = "exponential"  # or "lognormal" (sigma 1: a heavier tail than the model assumes)
    maturity_days: float = 14.0
    seed: int = 0
    epochs: int = 8


def simulated_joined(study: DelayStudy) -> tuple[pa.Table, int]:
    """The world's decisions joined with their (eventual) outcomes, as `joined_decisions` gives them,
    and `now` in ms; every outcome carries its arrival time, so labelling at `now` hides the late ones."""
    logs = simulate_logs(WorldConfig(users=study.users, rounds=study.rounds, seed=study.seed))
    d = logs.to_pydict()
    rng = np.random.default_rng(study.seed + 11)
    n = len(d["t"])
    t = np.asarray(d["t"])
    round_ms = study.round_days * DAY_MS
    decided = (t * round_ms + rng.uniform(0, round_ms, size=n)).astype(np.int64)
    reward, cost = np.asarray(d["reward"]), np.asarray(d["cost"])
    purchase = (reward > 0) | (cost > 0)
    mean_ms = study.delay_mean_days * DAY_MS
    if study.delay_shape == "lognormal":
        sigma = 1.0
        delay = rng.lognormal(np.log(mean_ms) - sigma**2 / 2, sigma, size=n)
    elif study.delay_shape == "exponential":
        delay = rng.exponential(mean_ms, size=n)
    else:
        raise ValueError(f"delay_shape must be exponential or lognormal, got {study.delay_shape!r}")
    outcome_at = np.where(purchase, decided + delay.astype(np.int64), -1)
    features = np.stack([np.asarray(d[f"f{j}"]) for j in range(sum(1 for k in d if k[:1] == "f"))], axis=1)
    table = logs_table(
        np.asarray(d["user_id"]),
        t,
        np.asarray(d["action"]),
        np.where(purchase, cost, np.nan),
        np.where(purchase, reward, np.nan),
        features,
        {
            "decision_id": np.char.add("d", np.arange(n).astype(str)),
            "decided_at_ms": decided,
            "outcome_at_ms": outcome_at.astype(np.int64),
        },
    )
    now = int(study.rounds * round_ms)
    return table, now


def _fit_predict(table: pa.Table, population: np.ndarray, num_actions: int, study: DelayStudy) -> np.ndarray:
    """Mean predicted [revenue, spend] per decision for every action over `population`: [2, K]."""
    features = np.stack([table.column(f"f{j}").to_numpy() for j in range(population.shape[1])], axis=1)
    model = ResponseModel(population.shape[1], num_actions, ResponseConfig(epochs=study.epochs, seed=study.seed))
    model.fit(
        features.astype(np.float32),
        table.column("action").to_numpy(),
        table.column("reward").to_numpy(),
        table.column("cost").to_numpy(),
    )
    reward, cost = model.predict(population.astype(np.float32))
    return np.stack([reward.mean(0), cost.mean(0)])


def run_delay_study(study: DelayStudy, log: Callable[[str], None] | None = None) -> dict[str, object]:
    """Predicted revenue and spend per decision of each treatment, and their bias against the truth."""
    say = log or (lambda _m: None)
    joined, now = simulated_joined(study)
    num_actions = int(joined.column("action").to_numpy().max()) + 1
    population = np.stack(
        [joined.column(f"f{j}").to_numpy() for j in range(sum(1 for c in joined.column_names if c[:1] == "f"))],
        axis=1,
    )
    arrived_late = joined.column("outcome_at_ms").to_numpy() > now
    say(
        f"{joined.num_rows} decisions; {int(arrived_late.sum())} of "
        f"{int((joined.column('outcome_at_ms').to_numpy() >= 0).sum())} outcomes arrive after now"
    )
    truth, _ = label_outcomes(joined, np.iinfo(np.int64).max // 2, DelayConfig(method="naive"))
    predictions = {"truth": _fit_predict(truth, population, num_actions, study)}
    labels: dict[str, dict[str, float]] = {
        "truth": {"rows": float(truth.num_rows), "reward": float(np.mean(truth.column("reward").to_numpy()))}
    }
    for method in ("naive", "maturity", "delay-model"):
        cfg = DelayConfig(method=method, maturity_ms=int(study.maturity_days * DAY_MS))
        labelled, metrics = label_outcomes(joined, now, cfg)
        say(f"{method}: {labelled.num_rows} rows; fitting the response model")
        predictions[method] = _fit_predict(labelled, population, num_actions, study)
        labels[method] = {**metrics, "reward": float(np.mean(labelled.column("reward").to_numpy()))}
    ref = predictions["truth"]
    methods: dict[str, dict[str, object]] = {}
    for name, pred in predictions.items():
        coupons = slice(1, None)  # the coupon actions (spend is 0 without one)
        methods[name] = {
            "revenue_per_decision": [round(float(x), 4) for x in pred[0]],
            "spend_per_decision": [round(float(x), 4) for x in pred[1]],
            "revenue_bias": round(float(pred[0].sum() / ref[0].sum() - 1), 4),
            "spend_bias": round(float(pred[1][coupons].sum() / ref[1][coupons].sum() - 1), 4),
            "rows": int(labels[name]["rows"]),
            "label_mean_reward": round(labels[name]["reward"], 4),
        }
    return {
        "decisions": joined.num_rows,
        "outcomes_after_now": int(arrived_late.sum()),
        "study": study.__dict__,
        "methods": methods,
    }
