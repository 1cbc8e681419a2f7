"""Waiting for a background operation by counting polls, never by the clock.

Tests assert progress (what an operation did before it was stopped or finished), not
speed: speed is for bench/. A bounded number of polls only keeps a hung chip from
hanging the suite.
"""

from __future__ import annotations

import time
from collections.abc import Callable

POLLS = 60_000  # with PAUSE: a minute at the least, far beyond any operation the tests start
PAUSE = 0.001   # seconds between polls, to leave the CPU to the chip's worker


def poll_until(condition: Callable[[], object], what: str, polls: int = POLLS) -> None:
    """Call ``condition`` until it is true; fail naming ``what`` after ``polls`` polls."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(PAUSE)
    raise AssertionError(f"{what}: not so after {polls} polls")
