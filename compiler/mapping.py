"""Tiling weight matrices onto crossbar arrays and placing the tiles.

A layer's matrix W (in_features x out_features) is cut, per sign, into blocks of at most
``rows`` inputs and ``cols // S`` outputs (S = M/K cells per weight). Tiles are placed
first-fit on a skyline: every array remembers, for each S-cell-wide column group, the
first row below the tiles placed there; a tile goes to the first array, and there to the
leftmost columns, where it fits below everything already placed. Small layers therefore
stack down an array instead of each taking full-height column strips.

Placement is deterministic. In incremental mode every tile already on the chip keeps its
place and raises the skyline over its columns, so new tiles never touch its cells.

Paired placement (``pairs=True``, for a chip whose arrays read differentially: the ADCs of
array 2p see array 2p's bit line minus the same bit line of array 2p+1) places a block once
on an array pair: its positive tile on array 2p, its negative tile at the same rows and
columns of array 2p+1; a block with one sign leaves its partner's cells erased.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nvcim.firmware_emu.contract.program_format import Tile


class CapacityError(ValueError):
    """The model needs more crossbar arrays than the chip has."""


class Placer:
    """First-fit skyline placement; grows past the chip so the shortfall can be stated."""

    def __init__(self, rows: int, cols: int, slices: int, pairs: bool = False):
        if cols < slices:
            raise CapacityError(f"arrays of {cols} columns cannot hold one {slices}-cell weight")
        self.rows, self.cols, self.slices, self.pairs = rows, cols, slices, pairs
        self.units = cols // slices                    # weight-wide column groups per array
        self.skyline = np.zeros((0, self.units), int)  # first free row of each group, per array
        self.lowest = np.zeros(0, int)                 # the smallest skyline value of each array

    def _grow(self, arrays: int) -> None:
        extra = arrays - len(self.lowest)
        if extra > 0:
            self.skyline = np.vstack([self.skyline, np.zeros((extra, self.units), int)])
            self.lowest = np.concatenate([self.lowest, np.zeros(extra, int)])

    def _occupy(self, array: int, first: int, last: int, bottom: int) -> None:
        line = self.skyline[array]
        line[first:last] = np.maximum(line[first:last], bottom)
        self.lowest[array] = line.min()

    def _unit(self, array: int) -> int:
        """The skyline an array's cells are kept in: its own, or (paired) its pair's."""
        return array // 2 if self.pairs else array

    def reserve(self, tile: Tile) -> None:
        """Mark an existing tile's cells as taken (incremental mode)."""
        unit = self._unit(tile.array)
        self._grow(unit + 1)
        first = tile.col // self.slices
        last = -(-(tile.col + tile.out_count * self.slices) // self.slices)
        self._occupy(unit, first, last, tile.row + tile.in_count)

    def fill(self, arrays: set[int]) -> None:
        """Take every cell of ``arrays`` (paired: of their pairs), so no new tile goes there."""
        for array in arrays:
            unit = self._unit(array)
            self._grow(unit + 1)
            self._occupy(unit, 0, self.units, self.rows)

    def blocks(self, in_features: int, out_features: int) -> list[tuple[int, int, int, int]]:
        """(in_start, in_count, out_start, out_count) blocks a matrix is cut into."""
        return [(i, min(self.rows, in_features - i), o, min(self.units, out_features - o))
                for i in range(0, in_features, self.rows)
                for o in range(0, out_features, self.units)]

    def place_layer(self, blocks: list[tuple[int, tuple[int, int, int, int]]]) -> list[Tile]:
        """Tiles for a layer's (sign, block) list, in its order; paired, each block's two signs share one spot."""
        if not self.pairs:
            return [self.place(sign, block) for sign, block in blocks]
        spots: dict[tuple[int, int, int, int], Tile] = {}
        for _, block in blocks:
            if block not in spots:
                spots[block] = self.place(1, block)       # on pair p: array p of the skyline
        return [Tile(sign, 2 * spot.array + (sign < 0), spot.row, spot.col, *block)
                for (sign, block), spot in ((sb, spots[sb[1]]) for sb in blocks)]

    def place(self, sign: int, block: tuple[int, int, int, int]) -> Tile:
        """One tile at the first fit (paired: the tile's ``array`` is the pair's index)."""
        in_start, in_count, out_start, out_count = block
        for array in np.flatnonzero(self.lowest + in_count <= self.rows):
            tops = sliding_window_view(self.skyline[array], out_count).max(axis=1)
            fits = np.flatnonzero(tops + in_count <= self.rows)
            if fits.size:
                first = int(fits[0])
                row = int(tops[first])
                break
        else:
            array, first, row = len(self.lowest), 0, 0
            self._grow(array + 1)
        self._occupy(int(array), first, first + out_count, row + in_count)
        return Tile(sign, int(array), row, first * self.slices, in_start, in_count, out_start, out_count)

    @property
    def arrays_needed(self) -> int:
        return 2 * len(self.lowest) if self.pairs else len(self.lowest)
