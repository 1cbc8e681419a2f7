"""The short commands' handlers, and what every handler shares.

A handler takes the chip and the request payload and returns the reply payload, or, for a
long command, an ``Operation`` whose chunks the chip runs (see ``operations``); it raises
ChipError to refuse. The cell commands are in ``cell_commands``, RUN and INFER in
``run_commands``; ``Chip.handlers`` maps each command code to its handler.
"""

from __future__ import annotations

import types
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import ChipConfig
from .contract.program_format import Program, ProgramFormatError, parse_code
from .contract.protocol import (MAX_PAYLOAD, BufReadArgs, BufWriteHeader, ErrorCode, IdentifyReply, Identity,
                                ProgramFetchReply, ProgramLoadArgs, RegReadArgs, RegReadReply, RegWriteArgs)
from .contract.registers import CHIP_ID_VALUE, VERSION_VALUE
from .errors import ChipError, expect_empty, parse_args, parse_header
from .operations import Operation

if TYPE_CHECKING:
    from .chip import Chip

Handler = Callable[["Chip", bytes], "bytes | Operation"]


def buffer_range(chip: Chip, offset: int, length: int) -> slice:
    """The staging-buffer bytes ``offset .. offset + length``, or BAD_ADDRESS if they are not all there."""
    if offset < 0 or length < 0 or offset + length > len(chip.buffer):
        raise ChipError(ErrorCode.BAD_ADDRESS, f"buffer range {offset}..{offset + length} outside the "
                        f"{len(chip.buffer)}-byte staging buffer")
    return slice(offset, offset + length)


def loaded(chip: Chip, name: str) -> Program:
    """The loaded program, or NO_PROGRAM naming the command that needs one."""
    if chip.program is None:
        raise ChipError(ErrorCode.NO_PROGRAM, f"{name}: no program loaded (PROGRAM_LOAD first)")
    return chip.program


def parse_program(config: ChipConfig, code: bytes) -> Program:
    """A code section for this chip's geometry, or BAD_PROGRAM saying what is wrong with it."""
    header = types.SimpleNamespace(weight_bits=config.weight_bits, cell_bits=config.cell_bits,
                                   array_rows=config.rows, array_cols=config.cols)
    try:
        return parse_code(code, header)
    except ProgramFormatError as e:
        raise ChipError(ErrorCode.BAD_PROGRAM, str(e)) from None


def ping(chip: Chip, payload: bytes) -> bytes:
    return payload


def identify(chip: Chip, payload: bytes) -> bytes:
    expect_empty("IDENTIFY", payload)
    return IdentifyReply.build(Identity(CHIP_ID_VALUE, VERSION_VALUE, chip.config.geometry, MAX_PAYLOAD))


def reg_read(chip: Chip, payload: bytes) -> bytes:
    addr = parse_args("REG_READ", RegReadArgs, payload).addr
    return RegReadReply.build(dict(value=chip.registers.read(addr)))


def reg_write(chip: Chip, payload: bytes) -> bytes:
    args = parse_args("REG_WRITE", RegWriteArgs, payload)
    chip.registers.write(args.addr, args.value)
    return b""


def buf_write(chip: Chip, payload: bytes) -> bytes:
    header, data = parse_header("BUF_WRITE", BufWriteHeader, payload)
    chip.buffer[buffer_range(chip, header.offset, len(data))] = data
    return b""


def buf_read(chip: Chip, payload: bytes) -> bytes:
    args = parse_args("BUF_READ", BufReadArgs, payload)
    if args.length > MAX_PAYLOAD:
        raise ChipError(ErrorCode.BAD_ARGUMENT, f"BUF_READ of {args.length} bytes exceeds the frame maximum "
                        f"{MAX_PAYLOAD}")
    return bytes(chip.buffer[buffer_range(chip, args.offset, args.length)])


def program_load(chip: Chip, payload: bytes) -> bytes:
    args = parse_args("PROGRAM_LOAD", ProgramLoadArgs, payload)
    c = chip.config
    built = (args.weight_bits, args.cell_bits, args.array_rows, args.array_cols)
    if built != (c.weight_bits, c.cell_bits, c.rows, c.cols):
        raise ChipError(ErrorCode.BAD_PROGRAM, f"program compiled for M={built[0]}, K={built[1]}, arrays of "
                        f"{built[2]}x{built[3]}; this chip has M={c.weight_bits}, K={c.cell_bits}, "
                        f"arrays of {c.rows}x{c.cols}")
    code = bytes(chip.buffer[buffer_range(chip, 0, args.length)])
    if zlib.crc32(code) != args.crc:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"code section CRC mismatch over {args.length} staged bytes")
    program = parse_program(c, code)
    problem = _placement_problem(chip, program)
    if problem:
        raise ChipError(ErrorCode.BAD_PROGRAM, problem)
    chip.program, chip.program_code = program, code
    chip.registers.done()
    return b""


def _placement_problem(chip: Chip, program: Program) -> str | None:
    """What of ``program`` lies outside this chip or outside the program itself, if anything."""
    s = program.slices
    for layer in program.layers:
        for ti, t in enumerate(layer.tiles):
            where = chip.cells.check_region(t.array, t.row, t.col, t.in_count, t.out_count * s)
            if where:
                return f"layer '{layer.name}' tile {ti}: {where}"
            if t.in_start + t.in_count > layer.in_features or t.out_start + t.out_count > layer.out_features:
                return f"layer '{layer.name}' tile {ti}: block outside the {layer.in_features}x{layer.out_features} weight"
            if t.col % s:
                return (f"layer '{layer.name}' tile {ti}: starts at column {t.col}, not at a multiple of {s}: a "
                        f"weight's {s} cells are one column group of the array (the presets find a weight's level "
                        f"there)")
    for ins in program.instructions:
        if ins.layer >= len(program.layers):
            return f"instruction '{ins.name}' uses layer {ins.layer}, program has {len(program.layers)}"
        if any(t >= len(program.tensors) for t in ins.inputs + ins.outputs):
            return f"instruction '{ins.name}' names a tensor beyond the {len(program.tensors)} declared"
    return None


def program_fetch(chip: Chip, payload: bytes) -> bytes:
    expect_empty("PROGRAM_FETCH", payload)
    if chip.program_code is None:
        raise ChipError(ErrorCode.NO_PROGRAM, "PROGRAM_FETCH: no program loaded")
    code = chip.program_code
    chip.buffer[buffer_range(chip, 0, len(code))] = code
    return ProgramFetchReply.build(dict(length=len(code), crc=zlib.crc32(code)))


def op_result(chip: Chip, payload: bytes) -> bytes:
    """The last background operation's reply, or its error; changes nothing, so a host may repeat it."""
    expect_empty("OP_RESULT", payload)
    return chip.operations.result()
