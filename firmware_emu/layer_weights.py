"""What the executor multiplies by: each layer's effective weights, read from the programmed cells.

The executor asks for a layer's weights by index; they come from the conductances of the
layer's tiles (so programming noise, stuck cells and drift show up in the outputs), and
are cached per cell generation: every write or erase bumps the generation, and the next
run recomputes. When some array the program uses has finite converters, a run instead
multiplies tile by tile through them (``converter_product``).
"""

from __future__ import annotations

import numpy as np

from .contract.program_format import Program, Tile, effective_weights
from .converters import LayerProduct, tiled_product
from .crossbar import CellArrays


class LayerWeights:
    """Effective weights of the loaded program's layers, from one chip's cells."""

    def __init__(self, cells: CellArrays):
        self.cells = cells
        self.program: Program | None = None
        self._cache: dict[int, tuple[int, np.ndarray]] = {}  # layer -> (cell generation, weights)
        self._arrays_used: tuple[Program | None, np.ndarray] = (None, np.zeros(0, np.intp))  # (program, its arrays)

    def load(self, program: Program | None) -> None:
        """Serve ``program``'s layers from now on (the cache starts empty)."""
        self.program = program
        self._cache.clear()

    def _conductance(self, t: Tile) -> np.ndarray:
        return self.cells.g[t.array, t.row:t.row + t.in_count, t.col:t.col + t.out_count * self.program.slices]

    def layer(self, index: int) -> np.ndarray:
        """Effective weights (in_features, out_features) of layer ``index``, cached per cell generation."""
        gen = self.cells.generation
        hit = self._cache.get(index)
        if hit is not None and hit[0] == gen:
            return hit[1]
        program = self.program
        tiles = program.layers[index].tiles
        w = effective_weights(program, index, lambda i: self._conductance(tiles[i]))
        self._cache[index] = (gen, w)
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
        layers = program.layers
        return tiled_product(program, lambda layer, i: self._conductance(layers[layer].tiles[i]), dac_bits, adc_bits)
