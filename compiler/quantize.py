"""Weight quantisation and bit slicing (DESIGN.md "Device physics").

level(w) = round(|w| / max|W| * (2^M - 1)),  w_q = sign(w) * max|W| / (2^M - 1) * level(w);
level = sum_j t_j * 2^(jK) with t_j the K-bit state of cell j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Quantized:
    levels: np.ndarray  # uint16 magnitudes in [0, 2^M - 1]
    signs: np.ndarray   # int8: +1, -1, or 0 where the level is 0 (both sides stay erased)
    scale: float        # weight value of one level: max|W| / (2^M - 1)

    def dequantize(self) -> np.ndarray:
        return (self.signs * self.levels * np.float64(self.scale)).astype(np.float32)


def quantize(w: np.ndarray, weight_bits: int) -> Quantized:
    """Per-tensor quantisation of ``w`` to ``weight_bits`` bits plus a sign."""
    w = np.asarray(w, dtype=np.float64)
    top = (1 << weight_bits) - 1
    wmax = float(np.abs(w).max()) if w.size else 0.0
    scale = wmax / top if wmax > 0 else 1.0
    levels = np.rint(np.abs(w) / scale).astype(np.uint16)
    signs = np.where(levels == 0, 0, np.sign(w)).astype(np.int8)
    return Quantized(levels, signs, np.float32(scale).item())


def fake_quantize(w: np.ndarray, weight_bits: int) -> np.ndarray:
    """The value the chip holds for ``w`` with ideal cells: quantise then dequantise."""
    return quantize(w, weight_bits).dequantize().reshape(np.shape(w))


def slice_levels(levels: np.ndarray, weight_bits: int, cell_bits: int) -> np.ndarray:
    """Split levels into M/K cell states; the new last axis is the slice index j."""
    shifts = cell_bits * np.arange(weight_bits // cell_bits, dtype=np.uint16)
    return ((levels[..., None] >> shifts) & ((1 << cell_bits) - 1)).astype(np.uint8)
