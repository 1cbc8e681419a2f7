"""Training and simulation that give the same bits whatever the machine's thread count.

torch splits a reduction (a sum, a mean, a loss over the batch) into one partial sum per
intra-op thread and adds the partials, so the rounding of every such sum depends on
``torch.get_num_threads()``. Measured here: a 100,000-element ``sum`` differs in its last
bits between 1 and 2 threads, and two epochs of LeNet-3 training end with different
weights. The tools therefore run training and Monte Carlo simulation with a fixed thread
count: same seed, same numbers on a laptop, a CI runner or a 64-core server. One thread
is also the fastest on a small shared machine (no oversubscription) and the natural unit
of a sweep, which runs tasks side by side instead (tools/sweep.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

FIXED_THREADS = 1
P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def fixed_threads(threads: int = FIXED_THREADS) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``threads``; restore the caller's after."""
    previous = torch.get_num_threads()
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def thread_independent(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: ``fn`` always runs under ``fixed_threads()``."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with fixed_threads():
            return fn(*args, **kwargs)
    return wrapper
