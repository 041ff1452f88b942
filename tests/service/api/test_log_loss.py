"""The decision log never loses an entry without saying so: a small SACO_LOG_MAX_ENTRIES and an exporter
that falls behind, through HTTP and `saco export`, on each kind of store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from fastapi.testclient import TestClient
from svc_http import ADMIN, campaign_body, users

from service.app import create_app
from service.settings import Settings
from service.state.store import StateStore

SACO = str(Path(sys.executable).with_name("saco"))
BOUND = 200


@pytest.fixture
def bounded_client(settings: Settings) -> Iterator[TestClient]:
    update = {"log_max_entries": BOUND, "sweep_interval_s": 0.1}
    with TestClient(create_app(settings.model_copy(update=update))) as test_client:
        yield test_client


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def export(store: StateStore, out: Path) -> tuple[int, dict[str, Any], str]:
    """`saco export` once: exit code, its JSON line, stderr."""
    cmd = [SACO, "export", "--redis-url", store.url, "--prefix", store.prefix, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def metric(client: TestClient, name: str, expected: float, timeout_s: float = 20.0) -> None:
    """Wait for the sweep to set `name{campaign="c"}` to `expected`."""
    line = f'{name}{{campaign="c"}} {float(expected)}'
    deadline = time.monotonic() + timeout_s
    while line not in (text := client.get("/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in text, [row for row in text.splitlines() if row.startswith(name)]


def exported_ids(out: Path, kind: str) -> list[str]:
    return list(pads.dataset(str(out / kind), format="parquet", partitioning="hive").to_table()["decision_id"])


def test_entries_trimmed_before_export_are_counted_reported_and_shown(
    bounded_client: TestClient, feature_dim: int, tmp_path: Path
) -> None:
    """Bound 200: 150 decisions, exported; then 600 decisions and 300 outcomes before the next export. The
    bound trims the 150 exported entries and about 700 never read: the next export counts exactly those
    (written minus exported), warns and exits 3; the campaign view and the metrics show them, and the
    sweep warned before and as they were lost."""
    client, out = bounded_client, tmp_path / "logs"
    store: StateStore = client.app.state.runtime.store  # type: ignore[attr-defined]
    warnings = Records()
    logging.getLogger("saco.service.metrics").addHandler(warnings)
    try:
        assert client.put("/v1/admin/campaigns/c", json=campaign_body(1_000_000.0), headers=ADMIN).status_code == 200

        def decide(prefix: str, n: int) -> list[dict[str, Any]]:  # one request a user: one log entry each
            decided = []
            for user in users(n, feature_dim, prefix=prefix):
                resp = client.post("/v1/campaigns/c/decisions", json={"requests": [user]})
                assert resp.status_code == 200, resp.text
                decided += resp.json()["decisions"]
            return decided

        decided = decide("a", 150)
        code, first, _ = export(store, out)
        assert (code, first["entries"], first["trimmed"], first["trimmed_by_campaign"]) == (0, 150, 0, {})

        for batch in range(3):  # the exporter falls behind
            decided += decide(f"b{batch}-", 200)
        outcomes = [{"decision_id": d["decision_id"], "reward": 1.0, "cost": 0.0} for d in decided[150:450]]
        assert client.post("/v1/campaigns/c/outcomes", json={"outcomes": outcomes}).json()["accepted"] == 300
        written = 750 + 300

        view = client.get("/v1/admin/campaigns/c", headers=ADMIN).json()
        held, lost = view["log_entries"], view["log_lost"]  # MAXLEN ~: up to a stream node above the bound
        assert BOUND <= held <= BOUND + 100 and lost == written - 150 - held >= 600
        metric(client, "saco_decision_log_lost", lost)
        metric(client, "saco_decision_log_export_lag", held)

        code, second, stderr = export(store, out)
        assert (second["entries"], second["trimmed"], second["trimmed_by_campaign"]) == (held, lost, {"c": lost})
        assert code == 3 and f"warning: {lost} log entries were trimmed before they were exported (c: {lost})" in stderr
        exported = len(exported_ids(out, "decisions")) + len(exported_ids(out, "outcomes"))
        assert (
            exported
            == first["entries"] + second["entries"]
            == first["decisions"] + second["decisions"] + second["outcomes"]
        )
        assert second["trimmed"] == written - exported  # exactly the entries never exported

        code, third, _ = export(store, out)  # nothing lost since the previous run
        assert (code, third["entries"], third["trimmed"]) == (0, 0, 0)
        metric(client, "saco_decision_log_export_lag", 0)
        assert client.get("/v1/admin/campaigns/c", headers=ADMIN).json()["log_lost"] == lost
    finally:
        logging.getLogger("saco.service.metrics").removeHandler(warnings)
    messages = [(r.getMessage(), getattr(r, "campaign", None)) for r in warnings.records]
    assert ("the exporter is behind: the decision log will lose entries unless it catches up", "c") in messages
    assert ("the decision log lost entries the exporter had not read", "c") in messages
