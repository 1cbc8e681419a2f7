"""The NVM cell arrays: conductance, last target, captured noise and age of every cell.

Erased cells hold g = 0 and are never pulsed. Programming a region either pulses every
cell once and captures its deviation with a read right after the write (open loop), or
runs the write-verify loop; a mask restricts either to a subset of the region so a host
can reflash some cells and touch no other. Programmed cells are stamped with the chip
clock, and read (and multiplied by) as they have drifted since (``drift``).
"""

from __future__ import annotations

import numpy as np

from .contract.protocol import CellQuantity, WriteStats
from .contract.variation import VariationMode, region_levels
from .drift import FRESH, Aging, CellAges
from .physics import DeviceModel, write_verify


class CellArrays:
    """All crossbar arrays of one chip, stored as dense (arrays, rows, cols) planes."""

    def __init__(self, arrays: int, rows: int, cols: int):
        self.shape = (arrays, rows, cols)
        # np.zeros maps untouched pages lazily, so a large, mostly empty chip is cheap.
        self.g = np.zeros(self.shape, dtype=np.float32)
        self.noise = np.zeros(self.shape, dtype=np.float32)
        self.target = np.zeros(self.shape, dtype=np.uint8)
        self.generation = 0  # bumps on every change, so cached weights know when to refresh
        self.dirty: set[int] = set()  # arrays changed since the owner last persisted them
        self.ages = CellAges(self.shape)
        self._stuck: dict[tuple, np.ndarray] = {}
        # per array: nothing written since power-up, every plane still all zero (an erase at clock 0 is a no-op)
        self._pristine = np.ones(arrays, bool)

    def check_region(self, array: int, row: int, col: int, height: int, width: int) -> str | None:
        """None if the region lies on the chip, else a message saying what is outside."""
        a, r, c = self.shape
        if not 0 <= array < a:
            return f"array {array} does not exist (chip has {a})"
        if height <= 0 or width <= 0:
            return f"empty region {height}x{width}"
        if row < 0 or row + height > r or col < 0 or col + width > c:
            return (f"region rows {row}..{row + height - 1}, cols {col}..{col + width - 1} "
                    f"outside array {array} ({r}x{c})")
        return None

    def stuck_map(self, array: int, seed: int, rate: float, g_max: float) -> np.ndarray | None:
        """Per cell of one array: NaN if healthy, else the conductance it is stuck at.

        Drawn from (seed, array) alone, so the same chip seed always has the same faults.
        """
        if rate <= 0:
            return None
        key = (array, seed, rate)
        if key not in self._stuck:
            rng = np.random.default_rng([seed, array, 0x5717C])
            u = rng.random(self.shape[1:], dtype=np.float32)
            self._stuck[key] = np.where(u < rate / 2, np.float32(0),
                                        np.where(u < rate, np.float32(g_max), np.float32(np.nan)))
        return self._stuck[key]

    def program(self, array: int, row: int, col: int, targets: np.ndarray, mask: np.ndarray | None,
                verify: bool, model: DeviceModel, rng: np.random.Generator,
                tol: float, max_iter: int, stuck: np.ndarray | None = None, clock: int = 0) -> WriteStats:
        """Program the (masked) region and stamp its cells with ``clock``."""
        h, w = targets.shape
        sl = (array, slice(row, row + h), slice(col, col + w))
        # the chosen cells, row-major: a whole region by slices; a masked one as flat indices into the
        # region and into the array's planes (numpy moves cells by index 2-3x faster than by a boolean mask)
        if mask is None:
            def chosen(region: np.ndarray) -> np.ndarray:
                return np.ravel(region)
        else:
            local = np.flatnonzero(mask)
            cells = local + (row * self.shape[2] + col)
            if w != self.shape[2]:
                cells += local // w * (self.shape[2] - w)

            def chosen(region: np.ndarray) -> np.ndarray:
                return np.ravel(region).take(local)
        t = chosen(targets)
        stuck_sel = None if stuck is None else chosen(stuck[sl[1:]])
        levels = None
        if not model.uniform and model.variation == VariationMode.WEIGHT_MAGNITUDE:
            levels = chosen(region_levels(self.target[array], row, col, targets, model.slices, model.cell_bits))
        # read-after-write: the last read of each cell is its captured deviation
        if verify:
            res = write_verify(model, t, tol, max_iter, rng, stuck_sel, levels)
            g, seen, pulses = res.g, res.last_read, int(res.pulses.sum())
            stats = WriteStats(t.size, pulses, int(res.reads.sum()), int(res.failed.sum()))
        else:
            g = model.pulse(t, rng, stuck_sel, levels)
            seen = model.read(g, rng)
            stats = WriteStats(t.size, t.size, t.size)
        captured = seen - t.astype(np.float32)
        if mask is None:                       # a whole region: copied by slices, no index arrays
            self.g[sl], self.noise[sl], self.target[sl] = (v.reshape(h, w) for v in (g, captured, t))
        else:
            self.g[array].reshape(-1)[cells] = g  # (each array's planes are contiguous: views)
            self.noise[array].reshape(-1)[cells] = captured
            self.target[array].reshape(-1)[cells] = t
        # only cells not stamped with this clock yet (a region erased just now holds it): no page written in vain
        self._pristine[array] = False
        restamp = self.ages.programmed_at[sl] != clock
        self.ages.stamp(array, sl[1], sl[2], restamp if mask is None else restamp & mask, clock)
        self.generation += 1
        self.dirty.add(array)
        return stats

    def restore(self, array: int, g: np.ndarray, target: np.ndarray, noise: np.ndarray,
                programmed_at: np.ndarray) -> None:
        """Load one array's planes (from the non-volatile image)."""
        self.g[array], self.target[array], self.noise[array] = g, target, noise
        self.ages.restore(array, programmed_at)
        self._pristine[array] = False

    def conductance(self, array: int, aging: Aging) -> np.ndarray:
        """One array's conductances as they read under ``aging`` (read only: may be a cached drifted plane)."""
        return self.ages.conductance(self.g[array], array, aging, self.generation)

    def read(self, array: int, row: int, col: int, height: int, width: int, quantity: int,
             model: DeviceModel, rng: np.random.Generator, aging: Aging = FRESH) -> np.ndarray:
        rows, cols = slice(row, row + height), slice(col, col + width)
        if quantity == CellQuantity.CONDUCTANCE:
            return model.read(self.conductance(array, aging)[rows, cols], rng)
        if quantity == CellQuantity.NOISE:
            return self.noise[array, rows, cols].copy()
        if quantity == CellQuantity.PROGRAM_TIME:
            return self.ages.programmed_at[array, rows, cols].astype(np.float32)
        return self.target[array, rows, cols].astype(np.float32)

    def erase(self, first: int, count: int, row: int, col: int, height: int, width: int, clock: int = 0) -> None:
        """Reset a region of ``count`` consecutive arrays to the erased state g = 0, stamped with ``clock``."""
        arrays = slice(first, first + count)
        sl = (arrays, slice(row, row + height), slice(col, col + width))
        if clock or not self._pristine[arrays].all():    # else every plane holds its erased value already
            for plane, value in ((self.g, 0), (self.noise, 0), (self.target, 0), (self.ages.programmed_at, clock)):
                _fill(plane[sl], value)
            if clock:
                self._pristine[arrays] = False
        self.generation += 1
        self.dirty.update(range(first, first + count))


def _fill(region: np.ndarray, value: int) -> None:
    """``region[...] = value``, skipped where every cell holds it already, bit for bit: reading the
    untouched pages of a fresh chip costs nothing, writing them makes the kernel allocate them."""
    bits = region.view(f"u{region.itemsize}")
    want = np.array(value, region.dtype).view(bits.dtype)
    if bits.flat[0] != want or (bits != want).any():
        region[...] = value
