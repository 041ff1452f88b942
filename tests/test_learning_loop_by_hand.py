"""The by-hand loop of docs/learning_loop.md, run as written on the first hours of a campaign's traffic: a real
`saco serve` on Redis serves the sequential world over HTTP (exploration and a holdout group on), then the
documented `saco export`, `saco train` and `saco retrain` commands run exactly as the docs print them (only the
Redis and service addresses replaced); the retrain promotes or refuses with its reasons and exits 0 either way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model_store import ModelStore
from research.world import SyntheticWorld, WorldConfig
from service.replicas import replicas

REPO = Path(__file__).resolve().parents[1]
SACO = str(Path(sys.executable).with_name("saco"))
TOKEN = "by-hand-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
DOC_REDIS, DOC_SERVICE = "redis://127.0.0.1:6379/0", "http://127.0.0.1:8000"


def documented_commands() -> dict[str, str]:
    """The `saco export`, `saco train` and `saco retrain` lines of the by-hand block, continuations joined."""
    text = (REPO / "docs" / "learning_loop.md").read_text()
    block = text.split("The pieces, by hand:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = re.sub(r"\\\n\s*", "", block).splitlines()
    out = {}
    for line in lines:
        match = re.match(r"\.venv/bin/saco (export|train|retrain) ", line)
        if match and match.group(1) not in out:
            out[match.group(1)] = line.strip()
    assert set(out) == {"export", "train", "retrain"}, block
    return out


def strict_json(line: str) -> dict[str, Any]:
    def refuse(constant: str) -> None:
        raise ValueError(f"not valid JSON: {constant}")

    return dict(json.loads(line, parse_constant=refuse))


def serve_world(base: str, campaign: str, users: int, rounds: int, seed: int) -> int:
    """The world's users round by round through the decisions API; outcomes of every round but the last are
    posted (the last round's conversions are still to come). Returns the decisions made."""
    world = SyntheticWorld(WorldConfig(users=users, rounds=rounds, seed=seed))
    episode = world.start(users, seed)
    made = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for t in range(rounds):
            features = world.features(episode)
            actions, ids = np.zeros(users, np.int64), [""] * users
            for lo in range(0, users, 100):
                body = {
                    "requests": [{"user_id": f"u{i}", "features": features[i].tolist()} for i in range(lo, lo + 100)]
                }
                resp = client.post(f"/v1/campaigns/{campaign}/decisions", json=body)
                assert resp.status_code == 200, resp.text
                for i, decision in enumerate(resp.json()["decisions"], start=lo):
                    actions[i], ids[i] = decision["action"], decision["decision_id"]
                made += 100
            response = world.step(episode, actions)
            if t < rounds - 1:
                outcomes = [
                    {"decision_id": ids[i], "reward": round(float(response.reward[i]), 2), "cost": float(c)}
                    for i, c in enumerate(response.cost)
                ]
                resp = client.post(f"/v1/campaigns/{campaign}/outcomes", json={"outcomes": outcomes})
                assert resp.status_code == 200 and resp.json()["accepted"] == users, resp.text
    return made


def test_the_documented_by_hand_loop_runs_on_fresh_traffic(
    redis_url: str, redis_prefix: str, trained_store: Path, tmp_path: Path
) -> None:
    commands = documented_commands()
    store = tmp_path / "var" / "store"
    shutil.copytree(trained_store, store)  # the model serving from the start (`saco train` on simulated logs)
    first = ModelStore(store).current_version()
    env = dict(os.environ, SACO_ADMIN_TOKEN=TOKEN, SACO_REDIS_PREFIX=redis_prefix, SACO_LOG_LEVEL="WARNING")
    env.pop("SACO_REDIS_URL", None)
    users, rounds = 300, 4
    with replicas(store, redis_url=redis_url, env=env, log_dir=tmp_path, timeout_s=60) as (base,):
        coupons = [{"action": a, "cost": v} for a, v in enumerate(WorldConfig().coupon_values) if a > 0]
        body = {
            "budget": 4000.0,
            "coupons": coupons,
            "expected_decisions": 4 * users * rounds,  # a horizon: the run recalibrates the campaign's lambda
            "exploration_rate": 0.2,
            "holdout_rate": 0.05,
        }
        assert httpx.put(f"{base}/v1/admin/campaigns/c1", json=body, headers=ADMIN).status_code == 200
        made = serve_world(base, "c1", users, rounds, seed=7)

        def run(name: str) -> dict[str, Any]:
            line = commands[name].replace(".venv/bin/saco", SACO).replace(DOC_REDIS, redis_url)
            done = subprocess.run(
                ["bash", "-c", line.replace(DOC_SERVICE, base)],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, (line, done.stderr[-3000:])
            assert not [x for x in done.stderr.splitlines() if x.startswith("error:")], done.stderr
            return strict_json(done.stdout.strip().splitlines()[-1])

        exported = run("export")
        assert exported["decisions"] == made == users * rounds
        assert exported["outcomes"] == users * (rounds - 1)
        trained = run("train")
        assert ModelStore(store).current_version() == trained["version"] != first

        report = run("retrain")
        assert report["decision"] in ("promoted", "refused") and report["reasons"], report
        assert report["inputs"]["delay"]["method"] == "delay-model"
        gate = report["metrics"]["gate"]
        assert gate["labelling"] == "delay-model" and gate["eval_decisions"] > 0
        assert report["metrics"]["data"]["pending"] >= users  # the last round's outcomes had not arrived
        (recalibrated,) = report["recalibrated"]
        assert recalibrated["campaign_id"] == "c1" and recalibrated["reason"], recalibrated
        if recalibrated["action"] == "patched":
            view = httpx.get(f"{base}/v1/admin/campaigns/c1", headers=ADMIN).json()
            assert view["lambda"] == pytest.approx(recalibrated["lam"])
        current = ModelStore(store).current_version()
        if report["decision"] == "promoted":
            assert current == report["candidate"]
            deadline = time.monotonic() + 30  # announced: the replica reloads it
            while httpx.get(base + "/readyz").json()["model_version"] != current:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        else:
            assert current == trained["version"]
