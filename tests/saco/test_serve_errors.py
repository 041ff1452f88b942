"""`saco serve` refuses to start with one clear line on stderr and exit code 2: a current model version
that does not verify (it never serves another version by itself), a Redis URL that is not one, a port
already in use, invalid settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import ModelStore
from service.state.servers import free_port


def serve(store: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SACO_")}
    environment.update(SACO_DEVICE="cpu", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "saco", "serve", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_corrupt_current_model_refuses_to_start(model_store_dir: Path) -> None:
    version = ModelStore(model_store_dir).current_version()
    assert version is not None
    model = model_store_dir / "versions" / version / "model.pt"
    model.write_bytes(model.read_bytes()[:-100])
    line = one_line(serve(model_store_dir, "--port", str(free_port())))
    assert f"version {version!r}" in line and "checksum" in line and "not starting" in line
    assert "saco models rollback" in line


def test_bad_redis_url(model_store_dir: Path) -> None:
    for url, reason in (
        ("http://127.0.0.1:6379/0", "schemes"),
        ("redis://:hunter2@127.0.0.1:notaport/0", "Port"),
        ("redis://127.0.0.1:6379/zero", "database"),
    ):
        line = one_line(serve(model_store_dir, "--port", str(free_port()), "--redis-url", url))
        assert "invalid Redis URL" in line and reason in line and "hunter2" not in line


def test_port_in_use(model_store_dir: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        line = one_line(serve(model_store_dir, "--port", str(port)))
    assert f"127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [("SACO_MAX_BODY_BYTES", "lots", "max_body_bytes"), ("SACO_METRICS_EXPOSURE", "everything", "metrics_exposure")],
)
def test_invalid_settings(model_store_dir: Path, name: str, value: str, field: str) -> None:
    line = one_line(serve(model_store_dir, "--port", str(free_port()), env={name: value}))
    assert "invalid settings" in line and field in line
