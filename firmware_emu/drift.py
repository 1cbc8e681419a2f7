"""Cell ageing on the emulated chip: when each cell was programmed and what it reads now.

Every programmed cell is stamped with the chip clock (CLOCK, seconds). Its drift exponent
nu is a property of the device: drawn once per cell from (SEED, array), like the stuck-cell
map, so the same chip seed always drifts the same way. Reading a cell at a later clock
value gives its programmed conductance times the preset's power law
(contract.retention). Drifted planes are cached per (array, cell generation, clock,
preset), so runs pay for drift once per clock step, and nothing at all while no cell
has aged (clock at the stamp of every programmed cell) or the preset does not drift.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .contract.retention import NO_DRIFT, Retention


class Aging(NamedTuple):
    """What cells are read under: the clock now, the seed that fixed their exponents, the preset's law."""

    clock: int = 0
    seed: int = 0
    retention: Retention = NO_DRIFT


FRESH = Aging()  # cells read as programmed: no time, no drift

class CellAges:
    """Programming time of every cell, and the conductances cells read after drifting."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        # np.zeros maps untouched pages lazily: arrays never programmed cost nothing
        self.programmed_at = np.zeros(shape, dtype=np.uint32)
        # per array, no programmed cell is older than this stamp (a lower bound, kept cheaply)
        self.oldest = np.full(shape[0], np.iinfo(np.uint32).max, dtype=np.uint64)
        self._z: dict[tuple[int, int], np.ndarray] = {}
        self._planes: dict[tuple, np.ndarray] = {}

    def stamp(self, array: int, rows: slice, cols: slice, selected: np.ndarray | None, clock: int) -> None:
        """Record that the selected cells of a region were programmed at ``clock``."""
        region = self.programmed_at[array, rows, cols]
        if selected is None:
            region[...] = clock
        else:
            region[selected] = clock
        self.oldest[array] = min(int(self.oldest[array]), clock)

    def restore(self, array: int, plane: np.ndarray) -> None:
        """Load one array's programming times (from the non-volatile image)."""
        self.programmed_at[array] = plane
        self.oldest[array] = int(plane.min())

    def aged(self, array: int, clock: int) -> bool:
        """True when some programmed cell of ``array`` is older than ``clock``."""
        return clock > int(self.oldest[array])

    def normals(self, array: int, seed: int) -> np.ndarray:
        """The fixed standard normal draw behind every cell's nu on one array, from (seed, array) alone."""
        key = (array, seed)
        if key not in self._z:
            rng = np.random.default_rng([seed, array, 0xD51F7])
            self._z[key] = rng.standard_normal(self.shape[1:], dtype=np.float32)
        return self._z[key]

    def conductance(self, g: np.ndarray, array: int, aging: Aging, generation: int) -> np.ndarray:
        """The whole plane ``g`` (array ``array``'s programmed conductances) as it reads under ``aging``.

        Returns ``g`` itself when nothing has drifted; otherwise a cached drifted copy, which
        callers must not modify.
        """
        clock, seed, retention = aging
        if not retention.drifts or not self.aged(array, clock):
            return g
        key = (array, generation, *aging)
        plane = self._planes.get(key)
        if plane is None:
            # planes of another clock, generation or preset are stale: at most one per array is kept
            self._planes = {k: v for k, v in self._planes.items() if k[1:] == key[1:]}
            nu = retention.exponents(self.normals(array, seed))
            age = (np.uint32(clock) - self.programmed_at[array]).astype(np.float32)
            plane = g * retention.factor(age, nu)
            plane.flags.writeable = False
            self._planes[key] = plane
        return plane
