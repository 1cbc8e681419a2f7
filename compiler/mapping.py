"""Tiling weight matrices onto crossbar arrays and placing the tiles.

A layer's matrix W (in_features x out_features) is cut, per sign, into blocks of at most
``rows`` inputs and ``cols // S`` outputs (S = M/K cells per weight). Tiles are placed
first-fit in column strips: array 0 is filled left to right, then array 1, and so on.
Placement is deterministic, and in incremental mode every tile already on the chip keeps
its place; new tiles only go into columns no existing tile uses.
"""

from __future__ import annotations

from firmware_emu.program_format import Tile


class CapacityError(ValueError):
    """The model needs more crossbar arrays than the chip has."""


class Placer:
    """First-fit column-strip placement; grows past the chip so the shortfall can be stated."""

    def __init__(self, rows: int, cols: int, slices: int):
        if cols < slices:
            raise CapacityError(f"arrays of {cols} columns cannot hold one {slices}-cell weight")
        self.rows, self.cols, self.slices = rows, cols, slices
        self.next_col: list[int] = []  # first free column of each array

    def reserve(self, tile: Tile) -> None:
        """Mark an existing tile's columns as taken (incremental mode)."""
        while len(self.next_col) <= tile.array:
            self.next_col.append(0)
        end = tile.col + tile.out_count * self.slices
        self.next_col[tile.array] = max(self.next_col[tile.array], end)

    def blocks(self, in_features: int, out_features: int) -> list[tuple[int, int, int, int]]:
        """(in_start, in_count, out_start, out_count) blocks a matrix is cut into."""
        per_tile = self.cols // self.slices
        return [(i, min(self.rows, in_features - i), o, min(per_tile, out_features - o))
                for i in range(0, in_features, self.rows)
                for o in range(0, out_features, per_tile)]

    def place(self, sign: int, block: tuple[int, int, int, int]) -> Tile:
        in_start, in_count, out_start, out_count = block
        width = out_count * self.slices
        array = next((a for a, c in enumerate(self.next_col) if c + width <= self.cols), None)
        if array is None:
            array = len(self.next_col)
            self.next_col.append(0)
        col = self.next_col[array]
        self.next_col[array] = col + width
        return Tile(sign, array, 0, col, in_start, in_count, out_start, out_count)

    @property
    def arrays_needed(self) -> int:
        return len(self.next_col)
