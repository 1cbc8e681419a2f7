"""The read noise's Gaussian source: Philox4x32-10 against its published answers, the
ziggurat's draws against the normal distribution's own CDF and tail, and the streams'
independence and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nvcim.firmware_emu.gaussian_source import TAIL, normals, philox, workspace

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> output
KNOWN = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN)
def test_philox_gives_the_published_known_answers(counter, key, expected):
    words = philox(*(np.uint64(c) for c in counter), *(np.uint64(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def _draws(n: int, c1: int, c2: int, key=(7, 9)) -> np.ndarray:
    z = np.empty(n, np.float32)
    normals(z, np.empty(workspace(n), np.uint32), c1, c2, np.array(key, np.uint32))
    return z


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + torch.erf(torch.from_numpy(x.astype(np.float64)) / math.sqrt(2))).numpy()


def test_the_draws_follow_the_standard_normal_distribution():
    z = np.concatenate([_draws(1 << 16, 0, s) for s in range(64)]).astype(np.float64)   # 4 M draws
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    ordered = np.sort(z)
    cdf = _normal_cdf(ordered)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks * math.sqrt(n) < 1.95                    # Kolmogorov-Smirnov, 0.1 % level


def test_the_tails_hold_the_normal_distributions_mass():
    """The ziggurat's three ways out (one compare, a wedge's test, the tail beyond R) each
    hold their share: 32 M draws, where a tail sampler that lost 8 % of its mass is 7 sd off."""
    z = np.concatenate([_draws(1 << 16, 1, s) for s in range(512)])
    z = np.abs(z, out=z)
    for t in (1.0, 2.0, 3.0, TAIL, 4.0, 4.5):
        expected = z.size * math.erfc(t / math.sqrt(2))
        assert abs(np.count_nonzero(z > t) - expected) < 4 * math.sqrt(expected), t


def test_streams_are_reproducible_and_independent():
    a = _draws(10_000, 3, 4)
    assert np.array_equal(a, _draws(10_000, 3, 4))
    others = [_draws(10_000, 4, 4), _draws(10_000, 3, 5), _draws(10_000, 3, 4, key=(7, 10))]
    for b in others:
        assert not np.array_equal(a, b)
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)
    # neighbours within one stream (draws of consecutive batch vectors) are uncorrelated too
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / math.sqrt(a.size)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 127])
def test_any_count_of_draws_is_filled(n):
    z = np.full(n, np.nan, np.float32)
    normals(z, np.empty(workspace(n), np.uint32), 1, 2, np.array([3, 4], np.uint32))
    assert np.isfinite(z).all()
