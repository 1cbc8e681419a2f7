"""What the executor multiplies by: each layer's effective weights, read from the programmed cells.

The executor asks for a layer's weights by index; they come from the conductances of the
layer's tiles (so programming noise, stuck cells and drift show up in the outputs), and
are cached per cell generation and aging (clock, seed, preset): every write or erase bumps
the generation, every clock step changes the aging, and the next run recomputes. When
some array the program uses has finite converters, a run instead multiplies through them,
all tiles of a layer in one batched product; with read noise every product draws its own
(``products``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .contract.program_format import Program, Tile, effective_weights
from .converters import (
    ConverterPath,
    ConverterSettings,
    LayerProduct,
    NoiseStream,
    ReadNoise,
    ReadNoiseMap,
    Unit,
    pair_units,
)
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
        self._path: tuple[tuple, ConverterPath] | None = None  # ((program, generation, aging, settings), path)
        # the ADC units of (program, DIFFERENTIAL bits), and the read-noise maps that go with them
        self._units: tuple[tuple[Program | None, bytes], list[list[Unit]]] = ((None, b""), [])
        self._noise_maps: dict[int, ReadNoiseMap] = {}

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

    def check_pairs(self, differential: np.ndarray) -> None:
        """Raise ``converters.PairingError`` if a differential pair holds tiles of the program that are not mirrors."""
        self._pair_units(differential)

    def _used(self) -> np.ndarray:
        """The arrays the loaded program's tiles are on (found once per program)."""
        program = self.program
        if self._arrays_used[0] is not program:
            used = np.unique([t.array for layer in program.layers for t in layer.tiles]).astype(np.intp)
            self._arrays_used = (program, used)
        return self._arrays_used[1]

    def _pair_units(self, differential: np.ndarray) -> list[list[Unit]]:
        """The loaded program's ADC units under the DIFFERENTIAL bits (``converters.pair_units``; raises
        its PairingError when a tile faces another block's), kept while program and bits hold."""
        (program, bits), units = self._units
        if program is not self.program or bits != differential.tobytes():
            units = pair_units(self.program, differential)
            self._units = ((self.program, differential.tobytes()), units)
            self._noise_maps = {}
        return units

    def products(self, settings: ConverterSettings, all_ideal: bool, read_noise: float,
                 noise: NoiseStream) -> tuple[LayerProduct | None, ReadNoise | None]:
        """How one run multiplies: (converter product, None) when some array the program uses
        has finite converters (read noise, if any, added to every column sum inside it);
        else (None, read noise on the effective weights' products, or None without it).
        Raises ``converters.PairingError`` when a differential pair holds tiles that are not mirrors."""
        program = self.program
        used = self._used()
        units = self._pair_units(settings.differential)
        finite = not all_ideal and bool(settings.dac_bits[used].any() or settings.adc_bits[used].any())
        if not finite:
            if read_noise <= 0:
                return None, None
            maps = self._noise_maps                  # made again with the units (program, DIFFERENTIAL bits)

            def noise_map(index: int) -> ReadNoiseMap:
                if index not in maps:   # a differential tile without a mirror: its partner bit lines read too
                    doubled = frozenset(u.tile for u in units[index] if u.differential and u.mirror is None)
                    maps[index] = ReadNoiseMap(program, index, doubled)
                return maps[index]

            return None, ReadNoise(read_noise, noise, noise_map)
        aging = self.aging()
        key = (program, self.cells.generation, aging, settings.key())
        if self._path is None or self._path[0] != key:
            layers = program.layers
            self._path = (key, ConverterPath(
                program, lambda layer, i: self._conductance(layers[layer].tiles[i], aging), settings,
                units))
        return self._path[1].product(read_noise, noise), None
