"""Which tiles one set of ADCs reads: the pairing rule of differential readout.

In differential readout (ARRAY_CONVERTERS.DIFFERENTIAL) arrays 2p and 2p+1 form a pair and
the ADCs of 2p convert each bit line of 2p minus the same bit line of 2p+1. A block's
positive tile and its mirror (the same block's negative tile at the same rows and columns
of the partner array, as the compiler's paired placement puts it) then take one ADC
sample together. This rule is part of the chip's contract: the chip reads by it, the
driver's calibration measures ranges by it, and a program placed otherwise is refused
with the tiles named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .program_format import Program


@dataclass(frozen=True)
class Unit:
    """What one set of ADCs reads for a layer: a tile, the mirror tile its ADCs subtract (differential
    readout with a mirror), and the array whose converters read it (the pair's even array when differential)."""

    tile: int
    mirror: int | None
    array: int
    differential: bool


class PairingError(ValueError):
    """A tile on a differential pair faces something other than its mirror on the partner array."""


def pair_units(program: Program, differential: np.ndarray) -> list[list[Unit]]:
    """Every layer's ADC units under ``differential`` (per array): each tile alone on its own array's
    converters, except on differential pairs, where a positive tile and its mirror (the same block's
    negative tile at the same spot of the partner array) form one unit read by the even array.

    Raises ``PairingError`` naming the tiles when a tile on a differential pair overlaps a tile on the
    partner array that is not its mirror: the ADC would subtract another block's currents.
    """
    def name(li: int, i: int) -> str:
        t = program.layers[li].tiles[i]
        return (f"layer '{program.layers[li].name}' tile {i} ({'+' if t.sign > 0 else '-'}, array {t.array}, "
                f"rows {t.row}..{t.row + t.in_count - 1}, cols {t.col}..{t.col + t.out_count * program.slices - 1})")

    on_pair: dict[int, list[tuple[int, int]]] = {}
    for li, layer in enumerate(program.layers):
        for i, t in enumerate(layer.tiles):
            if t.array < len(differential) and differential[t.array]:
                on_pair.setdefault(t.array // 2, []).append((li, i))
    mirror: dict[tuple[int, int], tuple[int, int]] = {}
    s = program.slices
    for pair, tiles in on_pair.items():
        for a in tiles:
            ta = program.layers[a[0]].tiles[a[1]]
            if ta.array % 2:
                continue
            for b in tiles:
                tb = program.layers[b[0]].tiles[b[1]]
                if tb.array % 2 == 0 or tb.row >= ta.row + ta.in_count or ta.row >= tb.row + tb.in_count or \
                        tb.col >= ta.col + ta.out_count * s or ta.col >= tb.col + tb.out_count * s:
                    continue
                same = (a[0] == b[0] and tb.sign == -ta.sign and (ta.row, ta.col, ta.in_start, ta.in_count,
                        ta.out_start, ta.out_count) == (tb.row, tb.col, tb.in_start, tb.in_count, tb.out_start,
                                                        tb.out_count))
                if not same or a in mirror or b in mirror:
                    raise PairingError(
                        f"ARRAY_CONVERTERS.DIFFERENTIAL on arrays {2 * pair}/{2 * pair + 1}: {name(*a)} faces "
                        f"{name(*b)}, not its mirror; compile with paired placement or clear DIFFERENTIAL")
                mirror[a], mirror[b] = b, a
    units: list[list[Unit]] = []
    for li, layer in enumerate(program.layers):
        out = []
        for i, t in enumerate(layer.tiles):
            d = bool(t.array < len(differential) and differential[t.array])
            m = mirror.get((li, i))
            if m is not None and t.sign < 0:
                continue                                   # read as part of its positive mirror's unit
            out.append(Unit(i, None if m is None else m[1], t.array & ~1 if d else t.array, d))
        units.append(out)
    return units


def unit_cells(unit: Unit, cells: Callable[[int], np.ndarray]) -> np.ndarray:
    """What a unit's ADCs see of its cells: the tile's, minus its mirror's (float32)."""
    g = cells(unit.tile).astype(np.float32)
    return g if unit.mirror is None else g - cells(unit.mirror)
