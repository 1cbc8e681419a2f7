"""The chip's register map, declared once.

Every register the host can reach over the wire is listed here with its offset,
access, reset value and fields. The chip's register file, the driver's name lookup
and the generated documentation all come from this one table, so they cannot drift.

Fixed-point settings use Q16.16 in units of one cell's maximum conductance g_max
(e.g. SIGMA = 0.3 is written as round(0.3 * 65536)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from .geometry import Geometry
from .protocol import MAX_PAYLOAD


class Access(StrEnum):
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


class Readout(int, Enum):
    """Values of ARRAY_CONVERTERS.SHIFT_ADD: how an array's bit lines reach its ADCs."""

    COLUMN = 0     # one ADC per bit line; the S slices of a weight shifted and added digitally
    SHIFT_ADD = 1  # the S slice currents of a weight weighted 2^(jK) and summed before one ADC


class OpState(int, Enum):
    """Values of OP_STATUS.STATE: where the running or last background operation stands."""

    NONE = 0      # none since power-on or SOFT_RESET
    RUNNING = 1   # STATUS.BUSY = 1
    DONE = 2      # finished normally; OP_RESULT has its reply
    ABORTED = 3   # stopped by CONTROL.ABORT at a chunk boundary
    FAILED = 4    # stopped by an error; OP_RESULT has it


# The default build: CAP_* registers read its geometry unless the chip is built otherwise.
DEFAULT_GEOMETRY = Geometry()
DEFAULT_BUILD = dataclasses.asdict(DEFAULT_GEOMETRY)  # the same as a dict (for code that indexes it by name)


def _counter64(name: str, offset: int, description: str) -> tuple[Register, Register]:
    """A 64-bit counter as two registers; read LO first, then HI."""
    return (Register(f"CNT_{name}_LO", offset, Access.RO, 0, f"{description}, low word."),
            Register(f"CNT_{name}_HI", offset + 4, Access.RO, 0, f"{description}, high word."))


_B = DEFAULT_GEOMETRY
ALL_ARRAYS = 0xFFFFFFFF
REGISTERS: tuple[Register, ...] = (
    Register("CHIP_ID", 0x000, Access.RO, CHIP_ID_VALUE,
             "Identifies the part: 0x4E564331, 'NVC1' read most significant byte first."),
    Register("VERSION", 0x004, Access.RO, VERSION_VALUE, "Silicon / firmware revision.", (
        Field("PATCH", 0, 8, "patch level"),
        Field("MINOR", 8, 8, "minor revision"),
        Field("MAJOR", 16, 8, "major revision"),
    )),
    Register("CAP_ARRAYS", 0x008, Access.RO, _B.arrays, "Number of crossbar arrays (reset: default build)."),
    Register("CAP_GEOMETRY", 0x00C, Access.RO, _B.rows | _B.cols << 16,
             "Size of one crossbar array (reset: default build).", (
        Field("ROWS", 0, 16, "word lines (inputs) per array"),
        Field("COLS", 16, 16, "bit lines (outputs) per array"),
    )),
    Register("CAP_CELL", 0x010, Access.RO, _B.weight_bits | _B.cell_bits << 8,
             "Weight and cell precision the chip is built for (reset: default build).", (
        Field("WEIGHT_BITS", 0, 8, "M, bits per weight"),
        Field("CELL_BITS", 8, 8, "K, bits per cell"),
    )),
    Register("CAP_BUFFER", 0x014, Access.RO, _B.buffer_size, "Size of the host staging buffer in bytes."),
    Register("CAP_MAX_PAYLOAD", 0x018, Access.RO, MAX_PAYLOAD, "Largest frame payload the chip accepts, in bytes."),
    Register("CONTROL", 0x020, Access.WO, 0, "Command strobes; reads return 0.", (
        Field("SOFT_RESET", 0, 1, "1: clear status, error and counters, return every setting to its power-on "
                                  "value and reseed; cells and the loaded program (non-volatile) are kept"),
        Field("START", 1, 1, "1: start running the loaded program on RUN_BATCH inputs staged in the buffer, "
                             "as RUN does, in the background (STATUS.BUSY until it ends; OP_RESULT has its reply)"),
        Field("ABORT", 2, 1, "1: stop the running background operation at the next chunk boundary (work of "
                             "finished chunks is kept); no effect when none runs"),
    )),
    Register("STATUS", 0x024, Access.RO, 0x1, "Chip state.", (
        Field("READY", 0, 1, "1 when no background operation runs (= not BUSY): every command is served"),
        Field("BUSY", 1, 1, "1 while a background operation runs (FLAG_ASYNC command or CONTROL.START); "
                            "only PING, IDENTIFY, REG_READ, REG_WRITE and OP_RESULT are served"),
        Field("PROGRAM_LOADED", 2, 1, "1 when a program is loaded"),
        Field("ERROR", 3, 1, "1 when the last command failed (see ERROR_CODE)"),
        Field("BUS_ERROR", 4, 1, "1 after a read or write of an unmapped address or a write to a read-only "
                                 "register; cleared by SOFT_RESET"),
    )),
    Register("ERROR_CODE", 0x028, Access.RO, 0, "Error code of the last failed command (protocol.ErrorCode)."),
    Register("ERROR_ADDR", 0x02C, Access.RO, 0, "Address of the last bus error."),
    Register("IRQ_FLAGS", 0x030, Access.W1C, 0, "Sticky event flags; write 1 to clear.", (
        Field("DONE", 0, 1, "an operation finished (program load, cell write/erase/read, run)"),
        Field("ERROR", 1, 1, "a command failed"),
        Field("VERIFY_FAIL", 2, 1, "write-verify left at least one cell out of tolerance"),
        Field("ABORTED", 3, 1, "a background operation was stopped by CONTROL.ABORT"),
    )),
    Register("RUN_BATCH", 0x034, Access.RW, 1, "Batch size CONTROL.START runs."),
    Register("RUN_SEED", 0x038, Access.RW, 0,
             "Seed of the read noise of runs. Each RUN, INFER or CONTROL.START draws its read noise from the "
             "next stream after this seed, so two runs differ; writing it (even the same value) restarts the "
             "streams, so the same seed and the same runs give the same outputs."),
    Register("DEVICE_MODEL", 0x040, Access.RW, int(DeviceModelCode.GAUSSIAN),
             "Cell variation model (DeviceModelCode)."),
    Register("SIGMA", 0x044, Access.RW, round(0.3 * Q16), "Programming variation sigma, Q16.16 of g_max (<= 2.0)."),
    Register("READ_NOISE", 0x048, Access.RW, 0, "Read noise sigma, Q16.16 of g_max, <= 2.0 (0 = ideal read)."),
    Register("SEED", 0x04C, Access.RW, 0, "Seed of the chip's random processes; writing it reseeds."),
    Register("VERIFY_TOL", 0x050, Access.RW, round(0.06 * Q16), "Write-verify tolerance, Q16.16 of g_max (> 0)."),
    Register("VERIFY_MAX_ITER", 0x054, Access.RW, 16, "Write-verify iteration limit per cell (0..255)."),
    Register("CONFIG", 0x058, Access.RW, 0, "Cell model options.", (
        Field("CLIP", 0, 1, "1: programmed conductances are clipped to [0, g_max]"),
        Field("PER_CELL_STATE", 1, 1, "what a DEVICE_MODEL preset's middle band (0.25..0.75) is tested on: 0 the "
                                      "magnitude of the weight a cell belongs to, level/(2^M-1) over its M/K cells "
                                      "(U-SWIM's model); 1 each cell's own state t/g_max"),
    )),
    Register("STUCK_RATE", 0x05C, Access.RW, 0,
             "Fraction of cells stuck at 0 or g_max (half each), Q16.16 (<= 1.0); the map is fixed by SEED."),
    Register("ARRAY_SELECT", 0x060, Access.RW, ALL_ARRAYS,
             "Array that ARRAY_CONVERTERS, ARRAY_DAC_FS and ARRAY_ADC_FS address; 0xFFFFFFFF: writes go to every "
             "array, reads show array 0."),
    Register("ARRAY_CONVERTERS", 0x064, Access.RW, 0, "Converter resolution of the selected array(s).", (
        Field("DAC_BITS", 0, 8, "input DAC bits, sign included (0: ideal, else 1..16)"),
        Field("ADC_BITS", 8, 8, "column ADC bits, sign included (0: ideal, else 1..24)"),
        Field("SHIFT_ADD", 16, 1, "readout: 0 one ADC per bit line (each of a weight's S slice columns "
                                  "converted, shifted and added digitally); 1 analog shift-add, the S slice "
                                  "currents of a weight summed with gains 2^(jK) into one ADC per weight column "
                                  "(ADC_FS and its automatic bound then refer to that fused sum)"),
        Field("DIFFERENTIAL", 17, 1, "1: arrays 2p and 2p+1 read as a differential pair, the same on both (a "
                                     "write to either sets both): 2p's ADCs convert each bit line of 2p minus the "
                                     "same bit line of 2p+1, with 2p's converter settings, so a block's positive "
                                     "and negative tiles at one spot of the pair (the compiler's paired placement) "
                                     "take one ADC sample; a RUN whose tiles face another block's is refused. "
                                     "Reads 0 on an array without a partner"),
    )),
    Register("ARRAY_DAC_FS", 0x068, Access.RW, 0,
             "Input DAC full scale of the selected array(s), Q16.16 in input units: a row input x drives "
             "clip(x / DAC_FS, -1, 1) (0: per vector, each input vector scaled by its own largest abs(x) on the "
             "tile's rows). Set at deploy from calibration data."),
    Register("ARRAY_ADC_FS", 0x06C, Access.RW, 0,
             "Column ADC full scale of the selected array(s), Q16.16 of a column sum normalised to g_max and to "
             "the DAC's full scale (sum_i u_i g_ij / g_max, abs(u_i) <= 1); sums beyond it clip (0: the weight "
             "bound, the largest sum any input in the DAC range gives on the array's tiles). Set at deploy from "
             "calibration data."),
    Register("OP_STATUS", 0x070, Access.RO, 0, "The running or last background operation.", (
        Field("COMMAND", 0, 8, "its command code (CELLS_WRITE 0x40, CELLS_ERASE 0x42, RUN 0x50, INFER 0x51); 0: none "
                               "since power-on or SOFT_RESET"),
        Field("STATE", 8, 3, "0 NONE, 1 RUNNING, 2 DONE, 3 ABORTED, 4 FAILED (OP_RESULT has the error)"),
    )),
    Register("OP_PROGRESS", 0x074, Access.RO, 0, "Units done by the running or last background operation "
             "(CELLS_WRITE: region cells, CELLS_ERASE: array rows, RUN: samples); grows chunk by chunk."),
    Register("OP_TOTAL", 0x078, Access.RO, 0, "Units of the whole running or last background operation "
             "(same unit as OP_PROGRESS)."),
    Register("CLOCK", 0x0C0, Access.RW, 0,
             "Retention clock, seconds: cells are stamped with it when programmed and drift by the DEVICE_MODEL "
             "preset's power law as it advances; only moves forward (a smaller value is BAD_ARGUMENT); "
             "non-volatile, kept by SOFT_RESET."),
    Register("UID_LO", 0x0D0, Access.RO, 0, "Unique chip ID, low word (read first): a fuse set at manufacture, "
             "different on every chip (the emulator derives it from the chip's build seed, or keeps the one in its "
             "image)."),
    Register("UID_HI", 0x0D4, Access.RO, 0, "Unique chip ID, high word (see UID_LO)."),
    *_counter64("WRITE_PULSES", 0x100, "Write pulses issued since reset"),
    *_counter64("READ_PULSES", 0x108, "Read pulses issued since reset"),
    *_counter64("VERIFY_ITERS", 0x110, "Write-verify corrective pulses since reset"),
    *_counter64("VERIFY_FAILS", 0x118, "Cells left out of tolerance by write-verify since reset"),
    *_counter64("CELLS_WRITTEN", 0x120, "Cells programmed since reset"),
    *_counter64("MVM_OPS", 0x128, "Crossbar matrix-vector operations (one layer, one input vector) since reset"),
    *_counter64("BUSY_NS", 0x130, "Modelled busy time of programming and reads, ns"),
    *_counter64("ENERGY_PJ", 0x138, "Modelled energy of programming and reads, pJ"),
)

# Writable settings and the largest value each accepts (a write above it is BAD_ARGUMENT).
LIMITS: dict[str, int] = {"SIGMA": 2 * Q16, "READ_NOISE": 2 * Q16, "VERIFY_MAX_ITER": 255, "STUCK_RATE": Q16,
                          "RUN_BATCH": 1 << 20, "ARRAY_DAC_FS": 0x7FFFFFFF, "ARRAY_ADC_FS": 0x7FFFFFFF}

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


def field(register: str, name: str) -> Field:
    """One field of a register, by names: firmware and host take bit positions from here."""
    for f in lookup(register).fields:
        if f.name == name:
            return f
    raise KeyError(f"register {register} has no field {name}")
