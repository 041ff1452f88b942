"""Progress of long work on stderr: a live bar on a terminal; elsewhere (a log file, a container's log) one
plain line per refresh, at most every PERIOD_S seconds and whenever the work reports a milestone (an
epoch), instead of thousands of carriage returns in one line."""

from __future__ import annotations

import io
import sys
from typing import TextIO

from tqdm import tqdm

PERIOD_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines(io.TextIOBase):
    """tqdm's output as whole lines: each refresh (a carriage return, the status, padding) becomes one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(
    desc: str, total: int | None, unit: str = "it", *, disable: bool = False, stream: TextIO | None = None
) -> tqdm:
    """A tqdm bar on `stream` (stderr): live on a terminal, periodic log lines elsewhere."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=disable, mininterval=0.5)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        disable=disable,
        mininterval=PERIOD_S,
        maxinterval=PERIOD_S,
        bar_format=LINE_FORMAT if total else None,
    )
