"""The deployment: docker-compose.yml (parsed: no container engine runs here) names Redis with its
append-only file, several service replicas, the exporter and the scheduler, each with a command the `saco`
CLI accepts; scripts/topology starts the same processes locally and stops them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.main import get_command

from saco.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _parses(argv: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    """Parse a `saco ...` command line as the CLI would (without running it)."""
    assert argv[0] == "saco"
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert argv[1] in commands, f"saco has no command {argv[1]!r}"
    return commands[argv[1]].make_context(argv[1], argv[2:])


def test_compose_runs_redis_with_aof_replicas_the_exporter_and_the_scheduler(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert {"redis", "service", "exporter", "scheduler"} <= set(services)
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"
    assert services["service"]["deploy"]["replicas"] >= 2
    for name, subcommand in (("service", "serve"), ("exporter", "export"), ("scheduler", "retrain")):
        spec = services[name]
        assert spec["command"][1] == subcommand
        ctx = _parses(spec["command"], monkeypatch, spec["environment"])
        assert ctx.params is not None
        assert spec["environment"]["SACO_REDIS_URL"] == "redis://redis:6379/0"
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    scheduler = _parses(services["scheduler"]["command"], monkeypatch, services["scheduler"]["environment"])
    assert scheduler.params["cron"] and scheduler.params["export"] is False  # the exporter service exports
    assert scheduler.params["admin_url"] == "http://service:8000"
    mounts = {v.split(":")[1] for v in services["scheduler"]["volumes"]}
    assert mounts == {"/models", "/logs"}
    assert "./var/logs:/logs" in services["exporter"]["volumes"]


def test_the_topology_script_starts_and_stops_the_same_processes(model_store_dir: Path, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    topo = tmp_path / "topology"
    (topo).mkdir()
    shutil.copytree(model_store_dir, topo / "models")
    script = str(REPO / "scripts" / "topology")
    try:
        started = subprocess.run([script, "start", str(topo)], capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr
        urls = json.loads(started.stdout.strip().splitlines()[-1])
        assert len(urls["services"]) == 2
        for base in urls["services"]:
            assert httpx.get(base + "/readyz", timeout=5).status_code == 200
        status = subprocess.run([script, "status", str(topo)], capture_output=True, text=True, timeout=30).stdout
        for name in ("redis", "service-1", "service-2", "exporter", "scheduler"):
            assert f"{name}: running" in status
    finally:
        subprocess.run([script, "stop", str(topo)], capture_output=True, text=True, timeout=60)
    status = subprocess.run([script, "status", str(topo)], capture_output=True, text=True, timeout=30).stdout
    assert status.count(": stopped") == 5
