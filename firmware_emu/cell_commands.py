"""CELLS_WRITE, CELLS_READ and CELLS_ERASE: the commands that reach the cell arrays.

A write and an erase are long: their handlers check the request, then return an
``Operation`` whose steps program (or erase) the region in chunks of whole rows, counting
each chunk's pulses as it is done, so an abort keeps the rows already finished.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from construct import Construct

from .commands import buffer_range
from .contract.program_format import packed_size, unpack_cells
from .contract.protocol import (
    CellMode,
    CellQuantity,
    CellsEraseArgs,
    CellsReadArgs,
    CellsReadReply,
    CellsWriteArgs,
    CellsWriteReply,
    Command,
    ErrorCode,
    WriteStats,
)
from .contract.registers import Q16
from .errors import ChipError, parse_args
from .operations import Abort, Operation, Steps, primed
from .register_file import IRQ_VERIFY_FAIL

if TYPE_CHECKING:
    from .chip import Chip

# Chunks of the long commands: an abort takes effect, and a host's frame is served, between two.
WRITE_CHUNK_CELLS = 1 << 16  # CELLS_WRITE: whole rows, about this many cells (~10 ms of write-verify)
ERASE_CHUNK_CELLS = 1 << 18  # CELLS_ERASE: rows of one array, at most about this many cells


def region_args(chip: Chip, name: str, layout: Construct, payload: bytes, last_array: int = 0):
    """Parse a command's fixed-size arguments and check its cell region lies on the chip."""
    args = parse_args(name, layout, payload)
    r = args.region
    for array in (r.array, r.array + last_array):
        where = chip.cells.check_region(array, r.row, r.col, r.height, r.width)
        if where:
            raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {where}")
    return args


def cells_write(chip: Chip, payload: bytes) -> Operation:
    args = region_args(chip, "CELLS_WRITE", CellsWriteArgs, payload)
    r = args.region
    if args.mode not in CellMode._value2member_map_:
        raise ChipError(ErrorCode.BAD_ARGUMENT, f"CELLS_WRITE: mode {args.mode} is not 0 (open loop) or 1 (verify)")
    n = r.height * r.width
    k = chip.config.cell_bits
    size = packed_size(n, k)
    targets = unpack_cells(bytes(chip.buffer[buffer_range(chip, 0, size)]), 0, (r.height, r.width), k)
    mask = None
    if args.masked:
        mbytes = bytes(chip.buffer[buffer_range(chip, size, packed_size(n, 1))])
        mask = unpack_cells(mbytes, 0, (r.height, r.width), 1).astype(bool)
    steps = _write_steps(chip, r, targets, mask, args.mode == CellMode.VERIFY)
    return Operation(Command.CELLS_WRITE, n, primed(steps))


def _write_steps(chip: Chip, r, targets: np.ndarray, mask: np.ndarray | None, verify: bool) -> Steps:
    """Program the region in groups of whole rows, counting each group's pulses as it is done.

    Settings are taken now; the ones a write reads cannot change while it runs in the
    background (REG_WRITE refuses them with BUSY).
    """
    registers = chip.registers
    regs, device = registers.regs, registers.device
    stuck = chip.cells.stuck_map(r.array, regs["SEED"], regs["STUCK_RATE"] / Q16, device.g_max)
    tol, max_iter = regs["VERIFY_TOL"] / Q16, regs["VERIFY_MAX_ITER"]
    step = max(1, WRITE_CHUNK_CELLS // r.width)
    total, rows = WriteStats(), 0
    try:
        yield 0
        for r0 in range(0, r.height, step):
            stats = chip.cells.program(r.array, r.row + r0, r.col, targets[r0:r0 + step],
                                       None if mask is None else mask[r0:r0 + step], verify=verify,
                                       model=device, rng=registers.rng, tol=tol, max_iter=max_iter, stuck=stuck,
                                       clock=regs["CLOCK"])
            registers.count(stats)
            total += stats
            rows = min(r.height, r0 + step)
            if rows < r.height:
                yield rows * r.width
    except Abort:
        registers.done(IRQ_VERIFY_FAIL if total.verify_failures else 0, done=False)
        kept = f"rows {r.row}..{r.row + rows - 1} programmed" if rows else "no row programmed"
        raise ChipError(ErrorCode.ABORTED, (
            f"CELLS_WRITE aborted after {rows} of {r.height} rows ({rows * r.width} of {r.height * r.width} "
            f"cells) of array {r.array}: {kept}, rows {r.row + rows}..{r.row + r.height - 1} untouched; "
            f"{total.cells} cells selected, {total.write_pulses} write pulses, {total.read_pulses} read pulses, "
            f"{total.verify_failures} verify failures")) from None
    registers.done(IRQ_VERIFY_FAIL if total.verify_failures else 0)
    return CellsWriteReply.build(total)


def cells_read(chip: Chip, payload: bytes) -> bytes:
    args = region_args(chip, "CELLS_READ", CellsReadArgs, payload)
    r = args.region
    if args.quantity not in CellQuantity._value2member_map_:
        raise ChipError(ErrorCode.BAD_ARGUMENT, f"CELLS_READ: quantity {args.quantity} is not one of "
                        f"{', '.join(f'{q.value} ({q.name})' for q in CellQuantity)}")
    span = buffer_range(chip, 0, r.height * r.width * 4)
    registers = chip.registers
    values = chip.cells.read(r.array, r.row, r.col, r.height, r.width, args.quantity, registers.device, registers.rng,
                             registers.aging)
    registers.account(WriteStats(read_pulses=r.height * r.width if args.quantity == CellQuantity.CONDUCTANCE else 0))
    chip.buffer[span] = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return CellsReadReply.build(dict(length=span.stop))


def cells_erase(chip: Chip, payload: bytes) -> Operation:
    count = parse_args("CELLS_ERASE", CellsEraseArgs, payload).arrays
    if count == 0:
        raise ChipError(ErrorCode.BAD_ARGUMENT, "CELLS_ERASE: array count 0")
    r = region_args(chip, "CELLS_ERASE", CellsEraseArgs, payload, last_array=count - 1).region
    return Operation(Command.CELLS_ERASE, count * r.height, primed(_erase_steps(chip, r, count)))


def _erase_steps(chip: Chip, r, count: int) -> Steps:
    """Erase array by array, in row groups within an array."""
    step = max(1, ERASE_CHUNK_CELLS // r.width)
    total, done = count * r.height, 0
    try:
        yield 0
        for array in range(r.array, r.array + count):
            for r0 in range(0, r.height, step):
                rows = min(step, r.height - r0)
                chip.cells.erase(array, 1, r.row + r0, r.col, rows, r.width, chip.registers.regs["CLOCK"])
                done += rows
                if done < total:
                    yield done
    except Abort:
        whole, part = divmod(done, r.height)
        raise ChipError(ErrorCode.ABORTED, (
            f"CELLS_ERASE aborted after {done} of {total} rows: region erased in {whole} of {count} arrays "
            f"(from array {r.array})" + (f", and in rows {r.row}..{r.row + part - 1} of array {r.array + whole}"
                                         if part else "") + "; the rest untouched")) from None
    chip.registers.done()
    return b""
