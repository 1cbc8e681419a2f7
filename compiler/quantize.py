"""Weight quantisation and bit slicing (docs/device-model.md).

level(w) = round(|w| / max|W| * (2^M - 1)),  w_q = sign(w) * max|W| / (2^M - 1) * level(w);
level = sum_j t_j * 2^(jK) with t_j the K-bit state of cell j.

max|W| is taken over the whole tensor (the seeds' scheme, default) or per output
channel (``channel_axis``), which keeps small-magnitude channels from losing levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Quantized:
    levels: np.ndarray         # uint16 magnitudes in [0, 2^M - 1]
    signs: np.ndarray          # int8: +1, -1, or 0 where the level is 0 (both sides stay erased)
    scale: float | np.ndarray  # weight value of one level: a float, or per channel (broadcasts to levels)

    def dequantize(self) -> np.ndarray:
        return (self.signs * self.levels * np.asarray(self.scale, dtype=np.float64)).astype(np.float32)


def quantize(w: np.ndarray, weight_bits: int, channel_axis: int | None = None,
             wmax: float | None = None) -> Quantized:
    """Quantise ``w`` to ``weight_bits`` bits plus a sign.

    ``channel_axis``: one scale per index along this axis (per output channel); else one
    scale for the tensor, from ``wmax`` when given (a tensor split into several matrices).
    """
    w = np.asarray(w, dtype=np.float64)
    top = (1 << weight_bits) - 1
    if channel_axis is None:
        peak = float(np.abs(w).max()) if wmax is None and w.size else (wmax or 0.0)
        divisor = np.float64(peak / top if peak > 0 else 1.0)
        scale = np.float32(divisor).item()
    else:
        axes = tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
        peak = np.abs(w).max(axis=axes, keepdims=True)
        divisor = np.where(peak > 0, peak / top, 1.0)
        scale = divisor.astype(np.float32)
    # levels from the exact float64 step, as in the formula; the program stores it as float32
    levels = np.minimum(np.rint(np.abs(w) / divisor), top).astype(np.uint16)
    signs = np.where(levels == 0, 0, np.sign(w)).astype(np.int8)
    return Quantized(levels, signs, scale)


def fake_quantize(w: np.ndarray, weight_bits: int, channel_axis: int | None = None) -> np.ndarray:
    """The value the chip holds for ``w`` with ideal cells: quantise then dequantise."""
    return quantize(w, weight_bits, channel_axis).dequantize().reshape(np.shape(w))


def slice_levels(levels: np.ndarray, weight_bits: int, cell_bits: int) -> np.ndarray:
    """Split levels into M/K cell states; the new last axis is the slice index j."""
    shifts = cell_bits * np.arange(weight_bits // cell_bits, dtype=np.uint16)
    return ((levels[..., None] >> shifts) & ((1 << cell_bits) - 1)).astype(np.uint8)
