"""Progress on a non-terminal: whole lines at each milestone and at most every PERIOD_S seconds."""

from __future__ import annotations

import io

from offline import progress as progress_module
from offline.progress import progress


def test_off_a_terminal_progress_is_periodic_lines_without_carriage_returns(monkeypatch) -> None:
    log = io.StringIO()  # not a TTY, like a log file
    monkeypatch.setattr(progress_module, "PERIOD_S", 3600.0)  # no refresh by time within the test
    bar = progress("train", 3 * 1000, "step", stream=log)
    for epoch in range(1, 4):
        for _ in range(1000):
            bar.update(1)
        bar.set_postfix(epoch=epoch)  # a milestone: one line each
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 3 <= len(lines) <= 5  # the first display, one per epoch, the last
    assert all(line.startswith("train: ") for line in lines)
    assert "3000/3000 step (100%)" in lines[-1] and "epoch=3" in lines[-1]
