"""Delayed outcomes: the naive labelling ("no outcome yet" = no purchase) against the maturity window and
the delay model, on the synthetic world with simulated delays (research/delay_study.py).

    .venv/bin/python benchmarks/delayed_outcomes.py                          # exponential delays, mean 3 days
    .venv/bin/python benchmarks/delayed_outcomes.py --shape lognormal         # a heavier tail than the model's
    .venv/bin/python benchmarks/delayed_outcomes.py --users 1000 --epochs 4   # quicker

Prints one table per run (predicted revenue and spend per decision against the truth model's) and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from research.delay_study import DelayStudy, run_delay_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=DelayStudy.users)
    parser.add_argument("--rounds", type=int, default=DelayStudy.rounds)
    parser.add_argument("--round-days", type=float, default=DelayStudy.round_days)
    parser.add_argument("--delay-days", type=float, default=DelayStudy.delay_mean_days)
    parser.add_argument("--shape", choices=("exponential", "lognormal"), default=DelayStudy.delay_shape)
    parser.add_argument("--maturity-days", type=float, default=DelayStudy.maturity_days)
    parser.add_argument("--epochs", type=int, default=DelayStudy.epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    study = DelayStudy(
        users=args.users,
        rounds=args.rounds,
        round_days=args.round_days,
        delay_mean_days=args.delay_days,
        delay_shape=args.shape,
        maturity_days=args.maturity_days,
        seed=args.seed,
        epochs=args.epochs,
    )
    started = time.time()
    result = run_delay_study(study, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(
        f"{result['decisions']} decisions, {result['outcomes_after_now']} outcomes still to come at training time; "
        f"{study.delay_shape} delays, mean {study.delay_mean_days:g} days; maturity window {study.maturity_days:g} days"
    )
    print("| treatment | rows | predicted revenue / decision (bias) | predicted spend / decision (bias) |")
    print("|---|---|---|---|")
    for name, m in result["methods"].items():  # type: ignore[attr-defined]
        revenue, spend = sum(m["revenue_per_decision"]), sum(m["spend_per_decision"][1:])
        revenue_text = f"{revenue:.3f} ({m['revenue_bias']:+.1%})"
        print(f"| {name} | {m['rows']} | {revenue_text} | {spend:.3f} ({m['spend_bias']:+.1%}) |")
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
