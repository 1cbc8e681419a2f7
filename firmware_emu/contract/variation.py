"""How a preset's programming variation depends on what a cell stores (docs/device-model.md#state-dependent-presets).

A state-dependent preset with factor s widens the variation of a middle band and keeps
the average variance near sigma^2 by first rescaling sigma:

    sigma' = sigma / sqrt(0.4 s^2 + 0.6)
    std    = s * sigma'  inside the band (0.25, 0.75),  sigma'  outside it

The band can be tested on two things, chosen by CONFIG.PER_CELL_STATE:

* the **weight magnitude** (U-SWIM's model, the default): |w| / max|W| of the weight a
  cell belongs to, i.e. level / (2^M - 1) with level = sum_j t_j 2^(jK) over its S = M/K
  cells. Every cell of one weight gets the same std, so the weight's error is one
  Gaussian of std scale * g_max * sigma_w * sqrt(sum_j 4^(jK)). FeFET2's quiet state 0
  is the weight value 0 (level 0).
* the **cell state**: t / g_max of each cell on its own (the chip's rule before the
  per-weight one; kept for comparison).

A weight's cells are the S adjacent columns of one column group: group g of an array
holds columns g*S .. g*S + S - 1, slice j in column g*S + j (the compiler places every
tile at a multiple of S). This module is pure arithmetic on numpy arrays; the chip and the
host's noise model both use it.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

BAND = (0.25, 0.75)  # the middle band, as a fraction of the largest level or state
SHARE_IN_BAND = 0.4  # the share of items in the band the rescaling assumes


class VariationMode(IntEnum):
    """Values of CONFIG.PER_CELL_STATE: what a preset's middle band is tested on."""

    WEIGHT_MAGNITUDE = 0  # |w| / max|W| of the cell's weight (U-SWIM's model; the default)
    CELL_STATE = 1        # the cell's own state t / g_max


def band_sigmas(sigma: float, factor: float) -> tuple[float, float]:
    """(std outside the band, std inside it) for nominal ``sigma`` and middle-band ``factor`` s."""
    base = sigma / math.sqrt(SHARE_IN_BAND * factor * factor + (1 - SHARE_IN_BAND))
    return base, factor * base


def in_band(value: np.ndarray, top: float) -> np.ndarray:
    """True where value / top lies strictly inside the middle band."""
    frac = np.asarray(value, dtype=np.float64) / top
    return (frac > BAND[0]) & (frac < BAND[1])


def weight_sigmas(levels: np.ndarray, weight_bits: int, sigma: float, factor: float,
                  zero_sigma: float | None = None) -> np.ndarray:
    """Relative std (units of g_max) every cell of a weight with the given level gets.

    ``zero_sigma`` (FeFET2's 0.01) replaces the std of level-0 weights when given.
    """
    base, wide = band_sigmas(sigma, factor)
    rel = np.where(in_band(levels, (1 << weight_bits) - 1), np.float32(wide), np.float32(base))
    if zero_sigma is not None:
        rel = np.where(np.asarray(levels) == 0, np.float32(zero_sigma), rel)
    return rel.astype(np.float32)


def region_levels(stored: np.ndarray, row: int, col: int, targets: np.ndarray, slices: int,
                  cell_bits: int) -> np.ndarray:
    """Per cell of a write region, the level of the weight the cell belongs to.

    ``stored``: the array's target states as held before the write (rows x cols), read for
    the cells of a column group that fall outside the region; ``targets``: the region's
    new states at (row, col). Vectorised over the region: one pass, no loop per cell.
    """
    h, w = targets.shape
    cols = stored.shape[1]
    first = col - col % slices
    last = -(-(col + w) // slices) * slices
    groups = np.zeros((h, last - first), dtype=np.int64)
    inside = min(last, cols)
    groups[:, :inside - first] = stored[row:row + h, first:inside]
    groups[:, col - first:col - first + w] = targets
    place = np.int64(1) << (cell_bits * np.arange(slices, dtype=np.int64))
    levels = groups.reshape(h, -1, slices) @ place
    return np.repeat(levels, slices, axis=1)[:, col - first:col - first + w]
