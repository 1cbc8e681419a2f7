"""The chip's register map, declared once.

Every register the host can reach over the wire is listed here with its offset,
access, reset value and fields. The chip's register file, the driver's name lookup
and the generated documentation all come from this one table, so they cannot drift.

Fixed-point settings use Q16.16 in units of one cell's maximum conductance g_max
(e.g. SIGMA = 0.3 is written as round(0.3 * 65536)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Access(str, Enum):
    RO = "RO"    # read only; a write is a bus error
    RW = "RW"    # read / write
    WO = "WO"    # write only (reads return 0), e.g. command strobes
    W1C = "W1C"  # read; writing 1 to a bit clears it


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int
    description: str

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    reset: int
    description: str
    fields: tuple[Field, ...] = field(default_factory=tuple)


Q16 = 1 << 16

CHIP_ID_VALUE = 0x4E564331  # "NVC1"
VERSION_VALUE = (0 << 16) | (1 << 8) | 0  # 0.1.0


class DeviceModelCode(int, Enum):
    """Values of the DEVICE_MODEL register."""

    GAUSSIAN = 0
    RRAM1 = 1
    FEFET2 = 2
    RRAM4 = 3
    FEFET6 = 4


REGISTERS: tuple[Register, ...] = (
    Register("CHIP_ID", 0x000, Access.RO, CHIP_ID_VALUE, "Identifies the part: ASCII 'NVC1'."),
    Register("VERSION", 0x004, Access.RO, VERSION_VALUE, "Silicon / firmware revision.", (
        Field("PATCH", 0, 8, "patch level"),
        Field("MINOR", 8, 8, "minor revision"),
        Field("MAJOR", 16, 8, "major revision"),
    )),
    Register("CAP_ARRAYS", 0x008, Access.RO, 0, "Number of crossbar arrays on the chip."),
    Register("CAP_GEOMETRY", 0x00C, Access.RO, 0, "Size of one crossbar array.", (
        Field("ROWS", 0, 16, "word lines (inputs) per array"),
        Field("COLS", 16, 16, "bit lines (outputs) per array"),
    )),
    Register("CAP_CELL", 0x010, Access.RO, 0, "Weight and cell precision the chip is built for.", (
        Field("WEIGHT_BITS", 0, 8, "M, bits per weight"),
        Field("CELL_BITS", 8, 8, "K, bits per cell"),
    )),
    Register("CAP_BUFFER", 0x014, Access.RO, 0, "Size of the host staging buffer in bytes."),
    Register("CAP_MAX_PAYLOAD", 0x018, Access.RO, 0, "Largest frame payload the chip accepts, in bytes."),
    Register("CONTROL", 0x020, Access.WO, 0, "Command strobes; reads return 0.", (
        Field("SOFT_RESET", 0, 1, "1: clear status, error, counters and loaded program; cells are kept"),
        Field("ABORT", 1, 1, "1: abort the running operation"),
    )),
    Register("STATUS", 0x024, Access.RO, 0x1, "Chip state.", (
        Field("READY", 0, 1, "1 when idle and able to accept a command"),
        Field("BUSY", 1, 1, "1 while an operation runs"),
        Field("PROGRAM_LOADED", 2, 1, "1 when a program is loaded"),
        Field("ERROR", 3, 1, "1 when the last command failed (see ERROR_CODE)"),
        Field("BUS_ERROR", 4, 1, "1 after an access to an unmapped address or a read-only register"),
    )),
    Register("ERROR_CODE", 0x028, Access.RO, 0, "Error code of the last failed command (protocol.ErrorCode)."),
    Register("ERROR_ADDR", 0x02C, Access.RO, 0, "Address of the last bus error."),
    Register("IRQ_FLAGS", 0x030, Access.W1C, 0, "Interrupt flags; write 1 to clear.", (
        Field("DONE", 0, 1, "an operation finished"),
        Field("ERROR", 1, 1, "a command failed"),
        Field("VERIFY_FAIL", 2, 1, "write-verify left at least one cell out of tolerance"),
    )),
    Register("IRQ_ENABLE", 0x034, Access.RW, 0, "Interrupt enables, same bit layout as IRQ_FLAGS."),
    Register("DEVICE_MODEL", 0x040, Access.RW, DeviceModelCode.GAUSSIAN, "Cell variation model (DeviceModelCode)."),
    Register("SIGMA", 0x044, Access.RW, round(0.3 * Q16), "Programming variation sigma, Q16.16 of g_max."),
    Register("READ_NOISE", 0x048, Access.RW, 0, "Read noise sigma, Q16.16 of g_max (0 = ideal read)."),
    Register("SEED", 0x04C, Access.RW, 0, "Seed of the chip's random processes; writing it reseeds."),
    Register("VERIFY_TOL", 0x050, Access.RW, round(0.06 * Q16), "Write-verify tolerance, Q16.16 of g_max."),
    Register("VERIFY_MAX_ITER", 0x054, Access.RW, 16, "Write-verify iteration limit per cell."),
    Register("CONFIG", 0x058, Access.RW, 0, "Cell model options.", (
        Field("CLIP", 0, 1, "1: programmed conductances are clipped to [0, g_max]"),
    )),
    Register("STUCK_RATE", 0x05C, Access.RW, 0,
             "Fraction of cells stuck at 0 or g_max (half each), Q16.16; the map is fixed by SEED."),
    Register("CNT_WRITE_PULSES_LO", 0x100, Access.RO, 0, "Write pulses issued since reset, low word."),
    Register("CNT_WRITE_PULSES_HI", 0x104, Access.RO, 0, "Write pulses issued since reset, high word."),
    Register("CNT_READ_PULSES_LO", 0x108, Access.RO, 0, "Read pulses issued since reset, low word."),
    Register("CNT_READ_PULSES_HI", 0x10C, Access.RO, 0, "Read pulses issued since reset, high word."),
    Register("CNT_VERIFY_ITERS_LO", 0x110, Access.RO, 0, "Write-verify iterations (corrective pulses), low word."),
    Register("CNT_VERIFY_ITERS_HI", 0x114, Access.RO, 0, "Write-verify iterations (corrective pulses), high word."),
    Register("CNT_VERIFY_FAILS", 0x118, Access.RO, 0, "Cells left out of tolerance by write-verify."),
    Register("CNT_CELLS_WRITTEN", 0x11C, Access.RO, 0, "Cells programmed since reset."),
    Register("CNT_MVM_OPS", 0x120, Access.RO, 0, "Crossbar matrix-vector operations since reset."),
    Register("CNT_BUSY_NS_LO", 0x124, Access.RO, 0, "Modelled busy time of programming and reads, ns, low word."),
    Register("CNT_BUSY_NS_HI", 0x128, Access.RO, 0, "Modelled busy time of programming and reads, ns, high word."),
    Register("CNT_ENERGY_PJ_LO", 0x12C, Access.RO, 0, "Modelled energy of programming and reads, pJ, low word."),
    Register("CNT_ENERGY_PJ_HI", 0x130, Access.RO, 0, "Modelled energy of programming and reads, pJ, high word."),
)

BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
BY_OFFSET: dict[int, Register] = {r.offset: r for r in REGISTERS}


def lookup(name_or_offset: str | int) -> Register:
    """Find a register by name or byte offset; raise KeyError naming what was asked."""
    table = BY_NAME if isinstance(name_or_offset, str) else BY_OFFSET
    try:
        return table[name_or_offset]
    except KeyError:
        shown = name_or_offset if isinstance(name_or_offset, str) else f"0x{name_or_offset:03X}"
        raise KeyError(f"no register {shown} in the nvcim register map") from None
