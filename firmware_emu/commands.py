"""The short commands' handlers, and what every handler shares.

A handler takes the chip and the request payload and returns the reply payload, or, for a
long command, an ``Operation`` whose chunks the chip runs (see ``operations``); it raises
ChipError to refuse. The cell commands are in ``cell_commands``, RUN and INFER in
``run_commands``; ``Chip.handlers`` maps each command code to its handler.
"""

from __future__ import annotations

import math
import types
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .config import ChipConfig
from .contract.ops import OPS, PAD_MODES, output_shapes
from .contract.program_format import (
    MAX_SAMPLE_ELEMENTS,
    Instr,
    Opcode,
    Program,
    ProgramFormatError,
    kernel_elements,
    parse_code,
)
from .contract.protocol import (
    MAX_PAYLOAD,
    BufReadArgs,
    BufWriteHeader,
    ErrorCode,
    IdentifyReply,
    Identity,
    ProgramFetchReply,
    ProgramLoadArgs,
    RegReadArgs,
    RegReadReply,
    RegWriteArgs,
)
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
    """A code section for this chip's geometry, every index, id, size and cell range checked
    against it, or BAD_PROGRAM saying what is wrong with it."""
    header = types.SimpleNamespace(weight_bits=config.weight_bits, cell_bits=config.cell_bits,
                                   array_rows=config.rows, array_cols=config.cols)
    try:
        return parse_code(code, header, arrays=config.arrays)
    except ProgramFormatError as e:
        raise ChipError(ErrorCode.BAD_PROGRAM, str(e)) from None


PROBE_BATCH = 1  # the batch a program is tried on at load, as the compiler works out its shapes


def check_runnable(program: Program) -> None:
    """Refuse (BAD_PROGRAM, naming the instruction) a program whose instructions do not fit
    the op table: layer use, attributes, and, on a batch of PROBE_BATCH zeros, input counts and
    shapes against the declared tensors. Every size a kernel would allocate is bounded first,
    so a run of a loaded program can fail only on its inputs, never ask for unbounded memory."""
    env = {tid: np.asarray(v) for tid, v in program.constants.items()}
    for tid in program.inputs:
        env[tid] = np.zeros((PROBE_BATCH, *program.tensors[tid].shape[1:]), np.float32)
    zeros: dict[int, np.ndarray] = {}

    def weights(index: int) -> np.ndarray:  # only the shapes matter; calloc'd pages cost nothing
        if index not in zeros:
            layer = program.layers[index]
            zeros[index] = np.zeros((layer.in_features, layer.out_features), np.float32)
        return zeros[index]

    for ii, ins in enumerate(program.instructions):
        where = f"instruction {ii} ({ins.op.name} '{ins.name}')"
        args = [env[t] for t in ins.inputs]
        try:
            _check_instruction(program, ins, args)
            shapes = output_shapes(ins, args, weights)  # the op table's shape rule (CONV: no product)
        except ChipError as e:
            raise ChipError(ErrorCode.BAD_PROGRAM, f"{where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - whatever the kernel raises on a malformed instruction
            raise ChipError(ErrorCode.BAD_PROGRAM, f"{where} cannot run: {type(e).__name__}: {e}") from None
        if len(shapes) != len(ins.outputs):
            raise ChipError(ErrorCode.BAD_PROGRAM, f"{where} computes {len(shapes)} results for its "
                            f"{len(ins.outputs)} outputs")
        for tid, shape in zip(ins.outputs, shapes):
            decl = program.tensors[tid]
            if tuple(shape) != (PROBE_BATCH, *decl.shape[1:]):
                raise ChipError(ErrorCode.BAD_PROGRAM, f"{where} computes shape {tuple(shape[1:])} per sample "
                                f"(batch first: {tuple(shape[:1]) == (PROBE_BATCH,)}) for tensor {tid} "
                                f"('{decl.name}'), declared {decl.shape[1:]}")
            env[tid] = np.zeros(shape, np.float32)  # values never decide a shape; untouched pages cost nothing


def _check_instruction(program: Program, ins: Instr, args: list[np.ndarray]) -> None:
    """Layer use and attributes against the op table, and the sizes an op's kernel allocates."""
    spec = OPS[ins.op]
    if spec.unit == "crossbar":
        group = ins.attrs.get("group", [1])
        count = group[0] if len(group) == 1 and isinstance(group[0], int) else 0
        if ins.layer < 0 or count < 1 or ins.layer + count > len(program.layers):
            raise ChipError(ErrorCode.BAD_PROGRAM, f"uses layers {ins.layer}..{ins.layer + count - 1}; a crossbar op "
                            f"needs layers of the program's {len(program.layers)}")
    elif ins.layer != -1:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"a {spec.unit} op with layer {ins.layer} (expected -1)")
    declared = {a.name: a.type for a in spec.attrs}
    for name, values in ins.attrs.items():
        kind = declared.get(name)
        if kind is None:
            raise ChipError(ErrorCode.BAD_PROGRAM, f"has attribute '{name}', which {spec.name} does not take "
                            f"(takes: {', '.join(declared) or 'none'})")
        integral = all(isinstance(v, int) for v in values)
        if (kind != "ints" and len(values) != 1) or (kind in ("int", "ints") and not integral):
            raise ChipError(ErrorCode.BAD_PROGRAM, f"attribute '{name}' = {values}: expected "
                            f"{'one integer' if kind == 'int' else 'integers' if kind == 'ints' else 'one number'}")
        rule = _ATTR_RULES.get(name)
        if any(isinstance(v, float) and math.isnan(v) for v in values) or \
                (rule is not None and not all(rule[0](v) for v in values)):
            raise ChipError(ErrorCode.BAD_PROGRAM, f"attribute '{name}' = {values}: "
                            f"{rule[1] if rule else 'NaN is no value'}")
    missing = [name for name in declared if name not in ins.attrs]
    if missing:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"lacks attribute(s) {', '.join(missing)}")
    if ins.op == Opcode.TRANSPOSE and ins.attrs["perm"][:1] != [0]:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"perm {ins.attrs['perm']} moves the batch axis (perm[0] must be 0)")
    if ins.op == Opcode.RESHAPE and ins.attrs["shape"][:1] != [-1]:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"shape {ins.attrs['shape']} does not keep the batch (shape[0] must "
                        f"be -1)")
    limit = PROBE_BATCH * MAX_SAMPLE_ELEMENTS
    try:
        need = kernel_elements(ins, [x.shape for x in args], lambda i: program.layers[i].out_features)
    except ProgramFormatError as e:
        raise ChipError(ErrorCode.BAD_PROGRAM, str(e)) from None
    if need > limit:
        raise ChipError(ErrorCode.BAD_PROGRAM, f"would compute {need} values for a batch of {PROBE_BATCH}; "
                        f"a tensor holds at most {MAX_SAMPLE_ELEMENTS} per sample")


# value ranges of attributes, by name (the op table gives their meaning): (test, what is accepted)
_ATTR_RULES: dict[str, tuple[Callable[[int | float], bool], str]] = {
    "kernel": (lambda v: v >= 1, "window sizes are >= 1"),
    "strides": (lambda v: v >= 1, "strides are >= 1"),
    "dilations": (lambda v: v >= 1, "dilations are >= 1"),
    "group": (lambda v: v >= 1, "group is >= 1"),
    "ceil_pads": (lambda v: v >= 0, "ceil_mode's extra pads are >= 0"),
    "count_include_pad": (lambda v: v in (0, 1), "a flag is 0 or 1"),
    "keepdims": (lambda v: v in (0, 1), "a flag is 0 or 1"),
    "axis": (lambda v: v >= 1, "axes are >= 1 (dim 0 is the batch)"),
    "axes": (lambda v: v >= 1, "axes are >= 1 (dim 0 is the batch)"),
    "size": (lambda v: v >= 1, "a window holds >= 1 channels"),
    "depth": (lambda v: v >= 1, "depth is >= 1"),
    "mode": (lambda v: v in PAD_MODES, f"pad modes are {', '.join(f'{k} {n}' for k, n in PAD_MODES.items())}"),
}


def ping(chip: Chip, payload: bytes) -> bytes:
    return payload


def identify(chip: Chip, payload: bytes) -> bytes:
    expect_empty("IDENTIFY", payload)
    return IdentifyReply.build(Identity(CHIP_ID_VALUE, VERSION_VALUE, chip.config.geometry, MAX_PAYLOAD,
                                        chip.config.unique_id))


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
    check_runnable(program)
    chip.program, chip.program_code = program, code
    chip.registers.done()
    return b""


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
