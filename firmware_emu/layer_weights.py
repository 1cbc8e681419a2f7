"""What the executor multiplies by: each layer's effective weights, read from the programmed cells.

The executor asks for a layer's weights by index; they come from the conductances of the
layer's tiles (so programming noise, stuck cells and drift show up in the outputs), and
are cached per cell generation and aging (clock, seed, preset): every write or erase bumps
the generation, every clock step changes the aging, and the next run recomputes. When
some array the program uses has finite converters, a run instead multiplies tile by tile
through them (``converter_product``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .contract.program_format import Program, Tile, effective_weights
from .converters import LayerProduct, tiled_product
from .crossbar import CellArrays
from .drift import Aging


class LayerWeights:
    """Effective weights of the loaded program's layers, from one chip's cells."""

    def __init__(self, cells: CellArrays, aging: Callable[[], Aging]):
        self.cells = cells
        self.aging = aging  # what the cells are read under now (the chip's CLOCK, SEED, DEVICE_MODEL)
        self.program: Program | None = None
        self._cache: dict[int, tuple[tuple, np.ndarray]] = {}  # layer -> ((cell generation, aging), weights)
        self._arrays_used: tuple[Program | None, np.ndarray] = (None, np.zeros(0, np.intp))  # (program, its arrays)

    def load(self, program: Program | None) -> None:
        """Serve ``program``'s layers from now on (the cache starts empty)."""
        self.program = program
        self._cache.clear()

    def _conductance(self, t: Tile, aging: Aging) -> np.ndarray:
        plane = self.cells.conductance(t.array, aging)
        return plane[t.row:t.row + t.in_count, t.col:t.col + t.out_count * self.program.slices]

    def layer(self, index: int) -> np.ndarray:
        """Effective weights (in_features, out_features) of layer ``index``, cached per cell generation and aging."""
        aging = self.aging()
        key = (self.cells.generation, aging)
        hit = self._cache.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        program = self.program
        tiles = program.layers[index].tiles
        w = effective_weights(program, index, lambda i: self._conductance(tiles[i], aging))
        self._cache[index] = (key, w)
        return w

    def converter_product(self, dac_bits: np.ndarray, adc_bits: np.ndarray, all_ideal: bool) -> LayerProduct | None:
        """Tile-by-tile products when any array the program uses has finite converters, else None."""
        if all_ideal:
            return None
        program = self.program
        if self._arrays_used[0] is not program:  # once per program, not on every run
            used = np.unique([t.array for layer in program.layers for t in layer.tiles]).astype(np.intp)
            self._arrays_used = (program, used)
        used = self._arrays_used[1]
        if not (dac_bits[used].any() or adc_bits[used].any()):
            return None
        layers, aging = program.layers, self.aging()
        return tiled_product(program, lambda layer, i: self._conductance(layers[layer].tiles[i], aging), dac_bits,
                             adc_bits)
