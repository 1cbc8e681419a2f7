"""The chip's geometry, declared once.

How many crossbar arrays a chip has, their size, the weight and cell precision and the
staging buffer: what the CAP_* registers and IDENTIFY report, what the compiler places
a program for (``nvcim.compiler.Target`` is this class), and what an emulated chip is
built with (``ChipConfig`` extends it with power-on settings).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

CELL_BITS = (1, 2, 4, 8)  # a cell holds 1, 2, 4 or 8 bits of a weight
MAX_ARRAY_DIM = 0xFFFF    # arrays, rows and cols each fit a 16-bit register field


@dataclass(frozen=True)
class Geometry:
    """A chip's arrays, their size, its weight/cell precision and staging buffer (defaults: the default build)."""

    arrays: int = 256
    rows: int = 256       # word lines (inputs) per array
    cols: int = 256       # bit lines (outputs) per array
    weight_bits: int = 8  # M: bits per weight
    cell_bits: int = 2    # K: bits per cell
    buffer_size: int = 64 << 20  # bytes of the host staging buffer

    def __post_init__(self) -> None:
        if self.cell_bits not in CELL_BITS or self.weight_bits % self.cell_bits:
            raise ValueError(f"cell_bits={self.cell_bits} must be 1, 2, 4 or 8 and divide "
                             f"weight_bits={self.weight_bits}")
        for name in ("arrays", "rows", "cols"):
            if not 0 < getattr(self, name) <= MAX_ARRAY_DIM:
                raise ValueError(f"{name}={getattr(self, name)} must be in 1..{MAX_ARRAY_DIM}")

    @property
    def geometry(self) -> Geometry:
        """Just the geometry (of a subclass that adds other fields, such as a chip's build options)."""
        return Geometry(**{f.name: getattr(self, f.name) for f in fields(Geometry)})


GEOMETRY_FIELDS = tuple(f.name for f in fields(Geometry))
