"""Crossbar products through finite-resolution converters, tile by tile.

With ideal converters a layer's tiles combine exactly into one effective matrix
(executor.effective_weights), and the executor multiplies by that. A real array sees its
inputs through a DAC and delivers each column's partial sum through an ADC, so with
either converter set to a finite resolution the product must be formed per tile:

* DAC, b bits: each input vector is quantised symmetrically to 2^(b-1) - 1 levels of its
  own largest magnitude (a per-vector full scale, as a bit-serial input driver sets it);
* ADC, b bits: each tile's column sums are quantised symmetrically to 2^(b-1) - 1 levels
  of the largest magnitude that tile produces in this call (an ideal auto-ranging ADC);
* the digital unit then shifts, adds slices and subtracts the negative tiles as usual.

0 bits means ideal. Settings are per array (registers ARRAY_SELECT / ARRAY_CONVERTERS).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .contract.program_format import Program

LayerProduct = Callable[[int, np.ndarray], np.ndarray]  # (layer, x (P, in)) -> (P, out)


def quantise(x: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    """Symmetric uniform quantisation to ``bits`` (sign included), full scale = max |x| along ``axis``."""
    if bits <= 0:
        return x
    top = float((1 << (bits - 1)) - 1) if bits > 1 else 1.0
    full = np.abs(x).max(axis=axis, keepdims=axis is not None)
    step = np.where(full > 0, full / top, 1.0).astype(np.float32)
    return (np.rint(x / step) * step).astype(np.float32)


def tiled_product(program: Program, conductance: Callable[[int, int], np.ndarray],
                  dac_bits: np.ndarray, adc_bits: np.ndarray) -> LayerProduct:
    """A layer product that runs every tile through its array's converters.

    ``conductance(layer, tile)`` returns the tile's cells (in_count, out_count * S);
    ``dac_bits`` / ``adc_bits`` hold each array's resolution.
    """
    s, k = program.slices, program.cell_bits
    place = (2.0 ** (k * np.arange(s))).astype(np.float32)

    def product(layer_index: int, x: np.ndarray) -> np.ndarray:
        layer = program.layers[layer_index]
        y = np.zeros((x.shape[0], layer.out_features), dtype=np.float32)
        for i, tile in enumerate(layer.tiles):
            xin = quantise(x[:, tile.in_start:tile.in_start + tile.in_count], int(dac_bits[tile.array]), axis=1)
            sums = quantise(xin @ conductance(layer_index, i), int(adc_bits[tile.array]), axis=None)
            y[:, tile.out_start:tile.out_start + tile.out_count] += \
                tile.sign * (sums.reshape(len(x), tile.out_count, s) @ place)
        return y * np.asarray(layer.scale, dtype=np.float32)

    return product
