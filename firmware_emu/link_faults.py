"""Fault injection for the emulated link: flip, drop or duplicate bytes at a given rate.

Bench users turn it on to prove their host stack survives a noisy cable
(``emu://?link_faults=1e-3``, ``serve --link-faults 1e-3``). Faults are drawn from a
seeded generator, so a failing run can be replayed exactly.
"""

from __future__ import annotations

import numpy as np


class LinkFaults:
    def __init__(self, rate: float, seed: int = 0):
        if not 0 <= rate < 1:
            raise ValueError(f"link fault rate {rate} must be in [0, 1)")
        self.rate = rate
        self.rng = np.random.default_rng([seed, 0x11F4])
        self.injected = 0

    def __call__(self, data: bytes) -> bytes:
        """``data`` as it arrives at the far end: each byte is, with probability ``rate``,
        flipped in one bit, dropped, or sent twice (one third each)."""
        if self.rate == 0 or not data:
            return data
        hits = np.flatnonzero(self.rng.random(len(data)) < self.rate)
        if hits.size == 0:
            return data
        self.injected += hits.size
        kinds = self.rng.integers(0, 3, hits.size)
        bits = self.rng.integers(0, 8, hits.size)
        buf = np.frombuffer(data, dtype=np.uint8).copy()
        flip = hits[kinds == 0]
        buf[flip] ^= (1 << bits[kinds == 0]).astype(np.uint8)
        repeat = np.ones(len(buf), dtype=np.int64)
        repeat[hits[kinds == 1]] = 0  # dropped
        repeat[hits[kinds == 2]] = 2  # duplicated
        return np.repeat(buf, repeat).tobytes()
