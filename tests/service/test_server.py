"""The serving process's own set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.replicas import start_replica
from service.settings import Settings

CHECK = """
import resource, sys
from service.server import keep_freed_memory
if not keep_freed_memory():
    sys.exit(3)
def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
block = bytearray(8 << 20)  # 8 MB, zero-filled: every page touched
del block
before = faults()
block = bytearray(8 << 20)  # the same size again: reused, not mapped afresh
print(faults() - before)
"""


def test_freed_buffers_are_reused_without_page_faults() -> None:
    """The second 8 MB buffer (a 1,024-user forward's size) costs no fresh pages: glibc's default maps it
    anew (~2,000 faults here), with `keep_freed_memory` the freed block is reused."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    if done.returncode == 3:
        pytest.skip("not glibc: mallopt is not available")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 100


def test_the_served_process_runs_on_the_cpus_it_is_given(model_store_dir: Path) -> None:
    """SACO_CPUS pins the process before it starts its threads: every thread of a running service (event
    loop, inference thread, torch's) is on the given CPU."""
    cpu = min(os.sched_getaffinity(0))
    replica = start_replica(model_store_dir, env={"SACO_CPUS": str(cpu), "SACO_DEVICE": "cpu"})
    try:
        threads = list(Path(f"/proc/{replica.process.pid}/task").iterdir())
        assert len(threads) >= 2  # the event loop and the inference thread at least
        for thread in threads:
            allowed = next(
                line for line in (thread / "status").read_text().splitlines() if line.startswith("Cpus_allowed_list")
            )
            assert allowed.split()[-1] == str(cpu), (thread.name, allowed)
    finally:
        replica.stop()


def test_cpu_lists_are_read_as_the_kernel_writes_them() -> None:
    assert Settings(cpus="0-2,5").cpu_set() == {0, 1, 2, 5}
    assert Settings().cpu_set() is None
    for bad in ("", "a", "3-1", "0,", "1-", "-1"):
        with pytest.raises(ValidationError, match="CPU number or range"):
            Settings(cpus=bad)


def test_cpus_the_machine_lacks_are_refused_by_name() -> None:
    from service.server import pin_process

    with pytest.raises(ValueError, match="SACO_CPUS: cannot run on CPUs"):
        pin_process({4095})
    assert Settings(cpus="0-3").inference_threads() == 2
