import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_store import ModelStore, load_scripted
from offline.calibrate import (
    COST_RATIO_BOUNDS,
    BudgetUnreachable,
    calibrate_shards,
    expected_cost_ratios,
    search_monotone,
    search_reserved,
    search_slsqp,
)
from offline.env import LogEnvironment
from offline.export import export_and_publish
from offline.logs import Logs, load_logs, write_logs
from offline.response import OutcomeModel, ResponseConfig
from offline.rollout import SequencePolicy
from offline.train import TrainResult
from offline.windows import build_windows
from research.simulate import simulate_logs
from research.world import WorldConfig


def staircase(lam: float) -> tuple[float, float]:
    """A realistic spend curve: decreasing, piecewise constant (many discrete decisions)."""
    cost = float(np.floor(10_000 * np.exp(-lam)) / 1.0)
    return 3 * cost**0.8, cost


@pytest.mark.parametrize("budget", [500.0, 2_000.0, 7_500.0])
def test_monotone_search_hits_the_band_never_above(budget: float):
    result = search_monotone(staircase, budget)
    assert result.converged
    assert 0.98 * budget <= result.cost <= budget
    assert result.passes <= 25
    assert len(result.history) == result.passes


def test_non_binding_budget_returns_lambda_zero():
    result = search_monotone(staircase, 50_000.0)
    assert result.lam == 0.0 and result.cost == 10_000 and not result.converged


def test_unreachable_budget_raises_with_advice():
    with pytest.raises(BudgetUnreachable) as caught:
        search_monotone(lambda lam: (1.0, 100.0), 10.0, lam_max=100.0)
    assert (caught.value.cost, caught.value.budget) == (100.0, 10.0) and caught.value.lam >= 100.0
    advice = caught.value.advice("policy two-stage")
    assert advice.startswith("policy two-stage cannot be brought under the budget: it still spends 100.00")
    assert "raise the budget" in advice and "more users" in advice and "coupons' costs" in advice


def test_slsqp_never_reports_above_budget():
    result = search_slsqp(staircase, 2_000.0, max_iterations=15)
    assert result.cost <= 2_000.0
    assert result.passes >= 1


def test_bad_budget():
    with pytest.raises(ValueError):
        search_monotone(staircase, float("nan"))


def ledger_curve(lam: float) -> tuple[float, float]:
    """Revenue through a ledger: a low lambda loses revenue to refusals, a high one to unspent money;
    most revenue at lambda 2.5; spend falls with lambda and is above 900 below lambda 0.5."""
    revenue = 1_000.0 - 100.0 * (math.log(max(lam, 1e-3)) - math.log(2.5)) ** 2
    return revenue, 1_000.0 * math.exp(-0.2 * lam)


def test_reserved_search_finds_the_most_revenue():
    result = search_reserved(ledger_curve, 950.0, start=1.0)
    assert abs(result.lam - 2.5) < 0.05, result
    assert result.cost <= 950.0 and result.converged and result.method == "reserved"
    assert result.revenue == max(e.revenue for e in result.history if e.cost <= 950.0)


def test_reserved_search_never_returns_spend_above_budget():
    # the revenue peak (2.5) spends 607: a budget of 500 makes the peak infeasible
    result = search_reserved(ledger_curve, 500.0, start=4.0)
    assert result.cost <= 500.0
    assert result.lam == pytest.approx(5.0 * math.log(2.0), rel=0.02)  # the feasible boundary


def test_reserved_search_goes_down_to_zero_when_lower_is_always_better():
    result = search_reserved(lambda lam: (100.0 - lam, 10.0), 50.0, start=1.0)
    assert result.lam == 0.0


def test_reserved_search_unreachable():
    with pytest.raises(BudgetUnreachable):
        search_reserved(lambda lam: (1.0, 100.0), 10.0, start=1.0, lam_max=50.0)


# ---- the learned environment and `saco calibrate` on a tiny world ----------------------------------


def test_outcome_model_weights_come_from_its_seed_alone():
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    a = OutcomeModel(6, 3, ResponseConfig(seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)  # torch's global RNG is left as it was
    torch.manual_seed(2)
    b = OutcomeModel(6, 3, ResponseConfig(seed=7))
    c = OutcomeModel(6, 3, ResponseConfig(seed=8))
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.fixture(scope="module")
def tiny_env(tiny_logs: Logs) -> LogEnvironment:
    return LogEnvironment.fit(tiny_logs, seed=0)


def test_the_policy_observes_whole_purchases_with_the_expected_mean(tiny_env: LogEnvironment):
    rng = np.random.default_rng(0)
    sampled, expected, bought = [], [], []
    ep = tiny_env.start(20_000, seed=5)
    for _ in range(tiny_env.rounds):
        actions = rng.integers(0, tiny_env.num_actions, size=20_000)
        _, reward_if, _ = tiny_env._parts(ep)
        out = tiny_env.step(ep, actions)
        rows = np.arange(len(actions))
        # a sampled reward is nothing or the whole reward of a purchase, never a fraction of one
        assert np.all((out.reward == 0) | np.isclose(out.reward, reward_if[rows, actions]))
        sampled.append(out.reward.sum())
        expected.append(out.expected_reward.sum())
        bought.append((out.reward > 0).mean())
    assert np.mean(bought) < 0.6
    assert sum(sampled) == pytest.approx(sum(expected), rel=0.03)


def test_common_random_numbers(tiny_env: LogEnvironment):
    actions = np.arange(900) % tiny_env.num_actions
    a, b, c = (tiny_env.step(tiny_env.start(900, seed=s), actions).reward for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def run_saco(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "saco", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def published_files(store: Path) -> dict[str, str]:
    """sha256 of every file of every published version (and the store's pointers)."""
    files = [*(store / "versions").rglob("*"), store / "CURRENT", store / "HISTORY"]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def test_calibrate_twice_gives_the_same_lambda_and_shows_progress(
    tmp_path: Path, tiny_logs: Logs, tiny_model: TrainResult
):
    store = tmp_path / "store"
    export_and_publish(tiny_model, tiny_logs, ModelStore(store))
    logs = write_logs(simulate_logs(WorldConfig(users=300, rounds=5, seed=0)), tmp_path / "logs.parquet")
    assert load_logs(logs).sha256 == tiny_logs.sha256  # the logs tiny_model was trained on
    budget = str(round(0.5 * float(tiny_logs.cost.sum()), 2))
    args = ("calibrate", "--store", str(store), "--logs", str(logs), "--budget", budget, "--reservation", "strict")
    published = published_files(store)
    first, second = run_saco(*args), run_saco(*args)
    assert published_files(store) == published  # every published file byte-identical: calibrations are records
    one, two = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, second))
    assert one["lambda"] == two["lambda"] and one["cost"] == two["cost"], (one, two)
    assert one["reservation"] == "strict" and one["cost"] <= float(budget)
    artifact = ModelStore(store).load()
    assert ModelStore(store).calibrations.ids(artifact.version) == [one["calibration"], two["calibration"]]
    assert artifact.calibration is not None and artifact.calibration.id == two["calibration"]
    record = artifact.calibration
    assert record.budget == float(budget) and record.users == one["users"] and record.lam == two["lambda"]
    assert record.command.startswith("saco calibrate --store") and record.details["reservation"] == "strict"
    manifest = artifact.manifest
    assert manifest.default_lambda == one["lambda"] and artifact.published.default_lambda is None
    assert len(manifest.cost_ratios) == 5, manifest.cost_ratios  # one per round of the environment
    assert all(COST_RATIO_BOUNDS[0] <= r <= COST_RATIO_BOUNDS[1] for r in manifest.cost_ratios)
    # every stage is on stderr as it happens, in order
    lines = first.stderr.splitlines()
    stages = ["loaded model", "fitting the response model", "epoch 1/", "pass 1 (", "predicted spend"]
    where = [next(i for i, line in enumerate(lines) if stage in line) for stage in stages]
    assert where == sorted(where), first.stderr
    numbers = [int(line.split("pass ")[1].split(" ")[0]) for line in lines if "] pass " in line]
    assert re.match(r"\[ *\d+\.\ds\] loaded model", lines[0]), lines[0]  # each line says when, in seconds
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) > one["passes"]  # the passes without a ledger, then through it, then the table


def test_cost_ratios_undo_a_policy_s_bias_in_its_expected_costs(
    tmp_path: Path, tiny_logs: Logs, tiny_model: TrainResult, tiny_env: LogEnvironment
):
    """A policy whose expected costs are doubled (its decisions unchanged) gets half the unscaled policy's
    ratios: the environment's costs of the same choices over predictions twice as large."""
    store = ModelStore(tmp_path / "store")
    artifact = export_and_publish(tiny_model, tiny_logs, store)
    m = artifact.manifest

    def policy(bias: float) -> SequencePolicy:
        module = load_scripted(artifact.model_path)
        with torch.no_grad():
            module.cost_weight.mul_(bias)
            module.cost_bias.mul_(bias)
        return SequencePolicy(module, m.context_length, m.initial_rtg, m.initial_ctg, m.feature_dim)

    lam = 0.5
    plain = np.array(expected_cost_ratios(tiny_env, policy(1.0), lam, 500, seed=3))
    biased = np.array(expected_cost_ratios(tiny_env, policy(2.0), lam, 500, seed=3))
    assert plain.shape == (tiny_env.rounds,)
    low, high = COST_RATIO_BOUNDS
    inside = (plain > low) & (plain < high) & (plain / 2 > low)  # neither clipped
    assert inside.any(), plain
    np.testing.assert_allclose(biased[inside], plain[inside] / 2, rtol=1e-4)
    assert expected_cost_ratios(tiny_env, policy(1.0), lam, 500, seed=3) == plain.tolist()  # seeded


@pytest.fixture(scope="module")
def tiny_windows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("windows")
    logs = write_logs(simulate_logs(WorldConfig(users=300, rounds=5, seed=0)), directory / "logs.parquet")
    build_windows(logs, directory / "w", context_length=4, shards=4, threads=1)
    return directory / "w"


def test_calibration_over_shards_gives_the_same_lambda_on_one_process_or_many(
    tmp_path: Path, tiny_logs: Logs, tiny_model: TrainResult, tiny_windows: Path
):
    store = tmp_path / "store"
    export_and_publish(tiny_model, tiny_logs, ModelStore(store))
    budget = round(0.75 * float(tiny_logs.cost.sum()), 2)  # above the tiny model's spend floor
    one = calibrate_shards(ModelStore(store), tiny_windows, budget, fit_rows=600, workers=1)
    cli = run_saco(
        "calibrate", "--store", str(store), "--windows", str(tiny_windows), "--budget", str(budget),
        "--fit-rows", "600", "--workers", "2",
    )  # fmt: skip
    two = json.loads(cli.stdout.strip().splitlines()[-1])
    assert (two["lambda"], two["cost"], two["revenue"]) == (one["lambda"], one["cost"], one["revenue"])
    assert (one["workers"], two["workers"]) == (1, 2) and one["sample_users"] == one["users"] == 300
    assert 0.98 * budget <= one["cost"] <= budget and one["spend_standard_error"] == 0.0  # every user simulated
    assert 550 <= one["fit_rows"] <= 650  # a sample of users: about the rows asked for
    artifact = ModelStore(store).load()
    assert artifact.calibration is not None and artifact.calibration.id == two["calibration"]
    assert artifact.calibration.details["sample_users"] == 300 and len(artifact.manifest.cost_ratios) == 5
    assert "reading 4 shards (1500 rows, 300 users) in 2 worker(s)" in cli.stderr


def test_calibration_over_a_sample_of_users_states_its_sampling_error(
    tmp_path: Path, tiny_logs: Logs, tiny_model: TrainResult, tiny_windows: Path
):
    store = ModelStore(tmp_path / "store")
    export_and_publish(tiny_model, tiny_logs, store)
    budget = round(0.75 * float(tiny_logs.cost.sum()), 2)
    # a budget for 3,000 users, simulated with 100 of the 300
    result = calibrate_shards(store, tiny_windows, 10 * budget, users=3000, sample=100, fit_rows=600, seed=1)
    assert (result["users"], result["sample_users"]) == (3000, 100)
    assert 0 < result["spend_standard_error"] < 0.5 * result["cost"] and result["revenue_standard_error"] > 0
    assert 0.98 * 10 * budget <= result["cost"] <= 10 * budget  # the scaled spend meets the budget
    record = store.load().calibration
    assert record is not None and record.users == 3000
    assert record.details["spend_standard_error"] == result["spend_standard_error"]


def test_calibration_over_shards_refuses_the_strict_ledger(tmp_path: Path, tiny_windows: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "saco", "calibrate", "--store", str(tmp_path), "--windows", str(tiny_windows),
         "--budget", "10", "--reservation", "strict"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.startswith("error: --reservation strict simulates one ledger")


def test_calibrating_a_model_by_features_on_bundle_logs_grants_bundles(tmp_path: Path):
    """A model scoring by features, trained on logs whose actions are the rows of its table (no coupon, each
    coupon alone, then bundles of two): `saco calibrate` learns a response for every row the logs hold and
    simulates the policy choosing among them, bundles included; it records a lambda table."""
    import dataclasses

    from contract.catalog import Catalog
    from offline.calibrate import policy_in_environment
    from offline.logs import validate_table
    from offline.rollout import rollout
    from offline.train import TrainConfig, train

    coupons = [
        {"action": 1, "value": 2.0},
        {"action": 2, "kind": "percent", "value": 10.0, "cap": 5.0},
        {"action": 3, "value": 3.0, "min_spend": 25.0, "class": "threshold"},
    ]
    catalog = Catalog.parse(coupons, max_per_bundle=2)  # rows 4..6: the bundles of two coupons
    table = simulate_logs(WorldConfig(users=300, rounds=4, seed=3, catalog=catalog))
    logs = validate_table(table)
    assert logs.num_actions == 7
    cfg = TrainConfig(epochs=8, d_model=16, context_length=4, num_actions=4)
    result = train(logs, cfg, progress=False, action_table=catalog.action_descriptors())
    store = tmp_path / "store"
    export_and_publish(result, logs, ModelStore(store))
    path = write_logs(table, tmp_path / "bundles.parquet")
    budget = round(0.5 * float(logs.cost.sum()), 2)
    out = json.loads(
        run_saco("calibrate", "--store", str(store), "--logs", str(path), "--budget", str(budget)).stdout.splitlines()[
            -1
        ]
    )
    assert 0.98 * budget <= out["cost"] <= budget, out
    artifact = ModelStore(store).load()
    record = artifact.calibration
    assert record is not None and record.id == out["calibration"] and record.lam == out["lambda"]
    assert len(record.lambda_table) >= 2 and record.lambda_table[0].lam == 0.0
    assert len(artifact.manifest.cost_ratios) == 4  # one per round: the expected costs of the rows it grants

    env, policy = policy_in_environment(artifact, logs)
    assert env.num_actions == 7 and policy.action_table is not None and policy.action_table.shape[0] == 7
    granted = rollout(env, policy, out["lambda"]).action_counts
    assert len(granted) == 7 and granted[4:].sum() > 0, granted  # bundles of two coupons are granted
    beyond = dataclasses.replace(logs, action=np.where(logs.action == 6, 7, logs.action))
    with pytest.raises(ValueError, match="the logs hold action 7, beyond the 7 rows of model"):
        policy_in_environment(artifact, beyond)

    # over window shards: the same rows
    build_windows(path, tmp_path / "w", context_length=4, shards=2, threads=1)
    sharded = calibrate_shards(ModelStore(store), tmp_path / "w", budget, fit_rows=10_000)
    assert 0.98 * budget <= sharded["cost"] <= budget, sharded
