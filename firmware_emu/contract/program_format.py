"""The program format the chip executes, declared once with construct.

A program file is a fixed header, a *code* section (tensors, constants, weight layers
with their tile placement, instructions) and a *cell image* section (the target state of
every crossbar cell the program uses, packed K bits per cell). Each section carries its
own CRC-32, so the code can be replaced without touching the cells and vice versa.
Field-by-field documentation: docs/program-format.md, generated from these declarations
and the op table (``ops``).

Conventions:
* a weight layer holds W with shape (in_features, out_features) and computes x @ W;
  inputs drive crossbar rows, outputs come off columns;
* each weight is M/K cells ("slices"), slice j holding bits [jK, (j+1)K) of its level;
* a tile places the block W[in_start:in_start+in_count, out_start:out_start+out_count]
  of one sign (+1 positive array, -1 negative array) at rows [row, row+in_count) and
  columns [col, col+out_count*S) of one array; cell (r, o*S + j) holds slice j of
  weight (in_start + r, out_start + o);
* tensor shapes use -1 for the batch dimension.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache

import numpy as np
from construct import (
    Const,
    ConstructError,
    Enum,
    Float32l,
    GreedyBytes,
    Int8sl,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64sl,
    PascalString,
    Prefixed,
    PrefixedArray,
    Struct,
)

from .geometry import CELL_BITS, MAX_ARRAY_DIM

FORMAT_VERSION = 2
MAGIC = b"NVCP"


class ProgramFormatError(ValueError):
    """A program image that cannot be parsed; the message names the byte offset."""


class Opcode(IntEnum):
    """What an instruction does. Numbering groups the ops by unit; what each one means
    (attributes, shape rule, reference kernel) is its row in ``ops.OPS``."""

    # crossbar (layer >= 0)
    MATMUL = 1
    CONV = 2
    # digital, elementwise on two inputs with numpy broadcasting
    ADD = 16
    SUB = 17
    MUL = 18
    DIV = 19
    PRELU = 20
    # digital, elementwise on one input
    RELU = 32
    LEAKY_RELU = 33
    CLIP = 34
    SIGMOID = 35
    TANH = 36
    ELU = 37
    SELU = 38
    SOFTPLUS = 39
    SOFTSIGN = 40
    EXP = 41
    NEG = 42
    ABS = 43
    # digital, windows and reductions
    MAXPOOL = 64
    AVGPOOL = 65
    GLOBAL_AVGPOOL = 66
    GLOBAL_MAXPOOL = 67
    SOFTMAX = 68
    LOG_SOFTMAX = 69
    REDUCE_MEAN = 70
    REDUCE_SUM = 71
    REDUCE_MAX = 72
    LRN = 73
    # digital, data movement
    RESHAPE = 80
    TRANSPOSE = 81
    CONCAT = 82
    SLICE = 83
    PAD = 84
    SPLIT = 85
    ONE_HOT = 86


String = PascalString(Int16ul, "utf8")

HeaderStruct = Struct(
    "magic" / Const(MAGIC),
    "version" / Int16ul,
    "weight_bits" / Int8ul,
    "cell_bits" / Int8ul,
    "array_rows" / Int32ul,
    "array_cols" / Int32ul,
    "arrays_used" / Int32ul,
    "code_size" / Int32ul,
    "code_crc" / Int32ul,
    "cells_size" / Int32ul,
    "cells_crc" / Int32ul,
)
HEADER_SIZE = HeaderStruct.sizeof() + 4  # + header CRC-32

TensorStruct = Struct("name" / String, "shape" / PrefixedArray(Int8ul, Int32sl))
ConstantStruct = Struct("tensor" / Int32ul, "data" / Prefixed(Int32ul, GreedyBytes))
TileStruct = Struct(
    "sign" / Int8sl,
    "array" / Int32ul,
    "row" / Int32ul,
    "col" / Int32ul,
    "in_start" / Int32ul,
    "in_count" / Int32ul,
    "out_start" / Int32ul,
    "out_count" / Int32ul,
    "cells_offset" / Int32ul,
)
LayerStruct = Struct(
    "name" / String,
    "in_features" / Int32ul,
    "out_features" / Int32ul,
    "scales" / Prefixed(Int32ul, GreedyBytes),  # float32 LE: one (per tensor) or out_features
    "tiles" / PrefixedArray(Int32ul, TileStruct),
)
AttrStruct = Struct(
    "name" / PascalString(Int8ul, "utf8"),
    "ints" / PrefixedArray(Int8ul, Int64sl),
    "floats" / PrefixedArray(Int8ul, Float32l),
)
InstrStruct = Struct(
    "op" / Enum(Int16ul, Opcode),
    "name" / String,
    "layer" / Int32sl,
    "inputs" / PrefixedArray(Int8ul, Int32ul),
    "outputs" / PrefixedArray(Int8ul, Int32ul),
    "attrs" / PrefixedArray(Int8ul, AttrStruct),
)
CodeStruct = Struct(
    "tensors" / PrefixedArray(Int32ul, TensorStruct),
    "constants" / PrefixedArray(Int32ul, ConstantStruct),
    "layers" / PrefixedArray(Int32ul, LayerStruct),
    "instructions" / PrefixedArray(Int32ul, InstrStruct),
    "inputs" / PrefixedArray(Int16ul, Int32ul),
    "outputs" / PrefixedArray(Int16ul, Int32ul),
)
_CODE = CodeStruct.compile()  # the same layout, parsed and built 4-10x faster


@dataclass
class Tile:
    sign: int
    array: int
    row: int
    col: int
    in_start: int
    in_count: int
    out_start: int
    out_count: int
    cells_offset: int = 0


@dataclass
class Layer:
    """A weight matrix on the crossbars; ``scale`` is the weight value of one level.

    ``scale`` is a float (per-tensor quantisation) or a float32 array of out_features
    values (per output channel); either multiplies an (in, out) level matrix directly.
    """

    name: str
    in_features: int
    out_features: int
    scale: float | np.ndarray
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Instr:
    op: Opcode
    name: str
    inputs: list[int]
    outputs: list[int]
    layer: int = -1
    attrs: dict[str, list[int] | list[float]] = field(default_factory=dict)


@dataclass
class TensorDecl:
    name: str
    shape: tuple[int, ...]


@dataclass
class Program:
    """A compiled program: what the compiler emits and the chip loads."""

    weight_bits: int
    cell_bits: int
    array_rows: int
    array_cols: int
    tensors: list[TensorDecl]
    constants: dict[int, np.ndarray]
    layers: list[Layer]
    instructions: list[Instr]
    inputs: list[int]
    outputs: list[int]
    cells: bytes = b""

    @property
    def slices(self) -> int:
        return self.weight_bits // self.cell_bits

    @property
    def arrays_used(self) -> int:
        return 1 + max((t.array for layer in self.layers for t in layer.tiles), default=-1)

    def tile_cells_bytes(self, tile: Tile) -> bytes:
        """The packed cell image of one tile, as stored in the program."""
        size = packed_size(tile.in_count * tile.out_count * self.slices, self.cell_bits)
        return self.cells[tile.cells_offset:tile.cells_offset + size]

    def tile_cells(self, tile: Tile) -> np.ndarray:
        """Target states of one tile, shape (in_count, out_count * slices)."""
        shape = (tile.in_count, tile.out_count * self.slices)
        return unpack_cells(self.cells, tile.cells_offset, shape, self.cell_bits)

    # -- serialisation -------------------------------------------------------------
    def code_bytes(self) -> bytes:
        return _CODE.build(dict(
            tensors=[dict(name=t.name, shape=list(t.shape)) for t in self.tensors],
            constants=[dict(tensor=k, data=np.ascontiguousarray(v, dtype="<f4").tobytes())
                       for k, v in sorted(self.constants.items())],
            layers=[dict(name=layer.name, in_features=layer.in_features, out_features=layer.out_features,
                         scales=np.ascontiguousarray(layer.scale, dtype="<f4").tobytes(),
                         tiles=[vars(t) for t in layer.tiles]) for layer in self.layers],
            instructions=[dict(op=int(i.op), name=i.name, layer=i.layer, inputs=i.inputs,
                               outputs=i.outputs, attrs=[_attr(k, v) for k, v in i.attrs.items()])
                          for i in self.instructions],
            inputs=self.inputs, outputs=self.outputs,
        ))

    def to_bytes(self) -> bytes:
        code = self.code_bytes()
        header = HeaderStruct.build(dict(
            version=FORMAT_VERSION, weight_bits=self.weight_bits, cell_bits=self.cell_bits,
            array_rows=self.array_rows, array_cols=self.array_cols, arrays_used=self.arrays_used,
            code_size=len(code), code_crc=zlib.crc32(code),
            cells_size=len(self.cells), cells_crc=zlib.crc32(self.cells)))
        return header + zlib.crc32(header).to_bytes(4, "little") + code + self.cells

    @classmethod
    def from_bytes(cls, data: bytes, *, with_cells: bool = True) -> Program:
        """Parse a program image; every defect is reported with its byte offset."""
        header = parse_header(data)
        code_end = HEADER_SIZE + header.code_size
        code = bytes(data[HEADER_SIZE:code_end])
        if len(code) != header.code_size:
            raise ProgramFormatError(f"code section truncated: header says {header.code_size} bytes "
                                     f"at offset {HEADER_SIZE}, file has {len(code)}")
        if zlib.crc32(code) != header.code_crc:
            raise ProgramFormatError(f"code section CRC mismatch (bytes {HEADER_SIZE}..{code_end})")
        cells = b""
        if with_cells:
            cells = bytes(data[code_end:code_end + header.cells_size])
            if len(cells) != header.cells_size:
                raise ProgramFormatError(f"cell image truncated: header says {header.cells_size} bytes "
                                         f"at offset {code_end}, file has {len(cells)}")
            if zlib.crc32(cells) != header.cells_crc:
                raise ProgramFormatError(f"cell image CRC mismatch (bytes {code_end}..{code_end + len(cells)})")
        program = parse_code(code, header)
        program.cells = cells
        if with_cells:
            check_cell_image(program)
        return program


def _attr(name: str, value) -> dict:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(v, (int, np.integer)) for v in values):
        return dict(name=name, ints=[int(v) for v in values], floats=[])
    return dict(name=name, ints=[], floats=[float(v) for v in values])


def parse_header(data: bytes):
    if len(data) < HEADER_SIZE:
        raise ProgramFormatError(f"program is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    if bytes(data[:4]) != MAGIC:
        raise ProgramFormatError(f"bad magic {bytes(data[:4])!r} at offset 0, expected {MAGIC!r}")
    body = bytes(data[:HEADER_SIZE - 4])
    stored = int.from_bytes(data[HEADER_SIZE - 4:HEADER_SIZE], "little")
    if zlib.crc32(body) != stored:
        raise ProgramFormatError(f"header CRC mismatch at offset {HEADER_SIZE - 4}")
    header = HeaderStruct.parse(body)
    if header.version != FORMAT_VERSION:
        raise ProgramFormatError(f"program format version {header.version} at offset 4; "
                                 f"this chip runs version {FORMAT_VERSION}")
    return header


def parse_code(code: bytes, header, arrays: int | None = None) -> Program:
    """The code section for the geometry ``header`` gives (weight/cell bits, array rows and
    cols) and, when known, ``arrays`` arrays; every index, id, size and cell range is checked
    (``check_program``), so what parses can be executed without reading out of bounds."""
    if header.cell_bits not in CELL_BITS or not 0 < header.weight_bits <= 32 or header.weight_bits % header.cell_bits \
            or not (0 < header.array_rows <= MAX_ARRAY_DIM and 0 < header.array_cols <= MAX_ARRAY_DIM):
        raise ProgramFormatError(f"header: M={header.weight_bits}, K={header.cell_bits}, arrays of "
                                 f"{header.array_rows}x{header.array_cols} is no chip geometry (K one of "
                                 f"{CELL_BITS} dividing M <= 32; rows and cols in 1..{MAX_ARRAY_DIM})")
    try:
        c = _CODE.parse(code)
    # the compiled parser reports running out of bytes as struct.error; a name may not be UTF-8
    except (ConstructError, struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
        raise ProgramFormatError(f"code section malformed: {e}") from None
    try:
        instructions = [Instr(Opcode(int(i.op)), i.name, list(i.inputs), list(i.outputs), i.layer,
                              {a.name: list(a.ints) if a.ints else list(a.floats) for a in i.attrs})
                        for i in c.instructions]
    except ValueError as e:
        raise ProgramFormatError(f"code section: {e}") from None
    tensors = [TensorDecl(t.name, tuple(t.shape)) for t in c.tensors]
    _check_tensors(tensors)
    constants: dict[int, np.ndarray] = {}
    for i, k in enumerate(c.constants):
        if k.tensor >= len(tensors) or k.tensor in constants:
            raise ProgramFormatError(f"code section: constant {i} names tensor {k.tensor}, "
                                     + ("which has another constant" if k.tensor in constants
                                        else f"beyond the {len(tensors)} declared"))
        decl = tensors[k.tensor]
        if decl.shape[:1] == (-1,) or len(k.data) != 4 * math.prod(decl.shape):
            raise ProgramFormatError(f"code section: constant {i} of tensor {k.tensor} ('{decl.name}') holds "
                                     f"{len(k.data)} bytes; its shape {decl.shape} takes "
                                     f"{4 * math.prod(decl.shape)} (a constant has no batch dimension)")
        constants[k.tensor] = np.frombuffer(k.data, dtype="<f4").reshape(decl.shape).copy()
    program = Program(
        weight_bits=header.weight_bits, cell_bits=header.cell_bits,
        array_rows=header.array_rows, array_cols=header.array_cols,
        tensors=tensors, constants=constants,
        layers=[Layer(layer.name, layer.in_features, layer.out_features,
                      _scale(layer.scales, layer.out_features, layer.name),
                      [Tile(**{k: v for k, v in t.items() if not k.startswith("_")}) for t in layer.tiles])
                for layer in c.layers],
        instructions=instructions, inputs=list(c.inputs), outputs=list(c.outputs))
    check_program(program, arrays)
    return program


# -- bounds ---------------------------------------------------------------------------
MAX_RANK = 16                   # axes of a tensor
MAX_SAMPLE_ELEMENTS = 1 << 24   # values of one sample of a tensor (64 MiB of float32)


def _check_tensors(tensors: list[TensorDecl]) -> None:
    for tid, t in enumerate(tensors):
        dims = t.shape[1:] if t.shape[:1] == (-1,) else t.shape
        if len(t.shape) > MAX_RANK or any(d < 0 for d in dims) or math.prod(dims) > MAX_SAMPLE_ELEMENTS:
            raise ProgramFormatError(f"code section: tensor {tid} ('{t.name}') has shape {t.shape}; a tensor has at "
                                     f"most {MAX_RANK} axes, dims >= 0 but a first -1 (the batch) and at most "
                                     f"{MAX_SAMPLE_ELEMENTS} values per sample")


def kernel_elements(ins: Instr, shapes: list[tuple[int, ...]], out_features: Callable[[int], int]) -> int:
    """The most values the kernel of ``ins`` allocates at once on inputs of ``shapes``, for the
    ops that can grow their inputs (0 for the others, whose results are no bigger than their
    inputs); ``out_features(layer)`` gives a layer's outputs. Lets a chip or compiler refuse an
    instruction before running it asks for unbounded memory; ProgramFormatError for a window
    larger than its padded input."""
    op, a = ins.op, ins.attrs
    one = len(shapes) == 1
    if op in (Opcode.ADD, Opcode.SUB, Opcode.MUL, Opcode.DIV, Opcode.PRELU) and len(shapes) == 2:
        return math.prod(np.broadcast_shapes(*shapes))
    if op == Opcode.CONCAT:
        return sum(math.prod(s) for s in shapes)
    if op == Opcode.MATMUL and one and shapes[0]:
        return math.prod(shapes[0][:-1]) * out_features(ins.layer)
    if op == Opcode.PAD and one:
        pads, rank = a["pads"], len(shapes[0])
        return math.prod(d + max(b, 0) + max(e, 0) for d, b, e in zip(shapes[0], pads, pads[rank:]))
    if op == Opcode.LRN and one and len(shapes[0]) >= 2:
        return math.prod(shapes[0]) // max(shapes[0][1], 1) * (shapes[0][1] + a["size"][0])
    if op == Opcode.ONE_HOT and one:
        return math.prod(shapes[0]) * a["depth"][0]
    if op in (Opcode.CONV, Opcode.MAXPOOL, Opcode.AVGPOOL) and one and len(shapes[0]) >= 2:
        x, nd = shapes[0], len(a["kernel"])
        pads = list(a["pads"]) + [0] * 2 * nd
        padded = [n + max(b, 0) + max(e, 0) for n, b, e in zip(x[2:], pads, pads[nd:])]
        if any(k < 1 or (k - 1) * d + 1 > n for k, d, n in zip(a["kernel"], a["dilations"], padded)):
            raise ProgramFormatError(f"the {a['kernel']} window (dilations {a['dilations']}) does not fit the "
                                     f"padded input {padded}")
        out = math.prod((n - (k - 1) * d - 1) // max(s, 1) + 1
                        for n, k, d, s in zip(padded, a["kernel"], a["dilations"], a["strides"]))
        columns = out * math.prod(a["kernel"]) if op == Opcode.CONV else out  # a CONV's im2col rows
        return x[0] * x[1] * max(math.prod(padded), columns)
    return 0


def check_program(program: Program, arrays: int | None = None) -> None:
    """Raise ProgramFormatError naming the first index, id, size or cell range of ``program``
    that lies outside the program itself or outside a chip of its geometry with ``arrays``
    arrays (not checked when None); what passes can be run without reading out of bounds.

    Checked: tensor shapes and constants (``parse_code``), layers (sizes within the chip's
    capacity, finite scales, tiles of sign +-1 inside their weight and their array, no two
    on the same cells), instructions (layer -1 or a layer of the program, tensor ids
    declared, each input defined before it is read, each tensor written once) and the
    program's inputs (batch-first, not constants) and outputs (defined).
    """
    p = program
    s = p.slices
    n_tensors = len(p.tensors)
    capacity = None if arrays is None else arrays * p.array_rows * (p.array_cols // s)
    placed: list[tuple[int, int, int, int, int, str]] = []
    for li, layer in enumerate(p.layers):
        where = f"code section: layer {li} ('{layer.name}')"
        if layer.in_features < 1 or layer.out_features < 1 or \
                (capacity is not None and layer.in_features * layer.out_features > capacity):
            raise ProgramFormatError(f"{where} is {layer.in_features}x{layer.out_features}; a layer has >= 1 "
                                     f"inputs and outputs" + (f" and at most {capacity} weights (the chip's "
                                                              f"cells per sign)" if capacity is not None else ""))
        if not np.all(np.isfinite(layer.scale)):
            raise ProgramFormatError(f"{where} has a non-finite scale")
        for ti, t in enumerate(layer.tiles):
            at = f"{where} tile {ti}"
            if t.sign not in (1, -1):
                raise ProgramFormatError(f"{at}: sign {t.sign}, expected +1 or -1")
            if t.in_count < 1 or t.out_count < 1 or t.in_start + t.in_count > layer.in_features \
                    or t.out_start + t.out_count > layer.out_features:
                raise ProgramFormatError(f"{at}: block {t.in_start}+{t.in_count} x {t.out_start}+{t.out_count} "
                                         f"is empty or outside the {layer.in_features}x{layer.out_features} weight")
            width = t.out_count * s
            if (arrays is not None and t.array >= arrays) or t.row + t.in_count > p.array_rows \
                    or t.col + width > p.array_cols:
                raise ProgramFormatError(f"{at}: cells rows {t.row}..{t.row + t.in_count - 1}, cols {t.col}.."
                                         f"{t.col + width - 1} of array {t.array} are outside the chip's "
                                         + (f"{arrays} " if arrays is not None else "")
                                         + f"arrays of {p.array_rows}x{p.array_cols}")
            if t.col % s:
                raise ProgramFormatError(f"{at}: starts at column {t.col}, not at a multiple of {s}: a weight's {s} "
                                         f"cells are one column group of the array (where the presets find its level)")
            placed.append((t.array, t.row, t.col, t.in_count, width, at))
    total = sum(layer.in_features * layer.out_features for layer in p.layers)
    if capacity is not None and total > capacity:
        raise ProgramFormatError(f"code section: the {len(p.layers)} layers hold {total} weights; the chip's "
                                 f"cells of one sign hold {capacity}")
    _check_overlaps(placed, p.array_rows, p.array_cols)
    defined = [False] * n_tensors
    for tid in p.constants:
        defined[tid] = True
    for i, tid in enumerate(p.inputs):
        if tid >= n_tensors or defined[tid] or p.tensors[tid].shape[:1] != (-1,):
            raise ProgramFormatError(f"code section: program input {i} is tensor {tid}: "
                                     + (f"beyond the {n_tensors} declared" if tid >= n_tensors else
                                        "a constant or another input" if defined[tid] else
                                        f"its shape {p.tensors[tid].shape} does not start with the batch (-1)"))
        defined[tid] = True
    for ii, ins in enumerate(p.instructions):
        where = f"code section: instruction {ii} ({ins.op.name} '{ins.name}')"
        if not -1 <= ins.layer < len(p.layers):
            raise ProgramFormatError(f"{where} uses layer {ins.layer}; the program has {len(p.layers)} "
                                     f"(-1: no layer)")
        for tid in ins.inputs:
            if tid >= n_tensors or not defined[tid]:
                raise ProgramFormatError(f"{where} reads tensor {tid}, which is "
                                         + (f"beyond the {n_tensors} declared" if tid >= n_tensors
                                            else "not computed before it"))
        for tid in ins.outputs:
            if tid >= n_tensors or defined[tid] or p.tensors[tid].shape[:1] != (-1,):
                raise ProgramFormatError(f"{where} writes tensor {tid}, which is "
                                         + (f"beyond the {n_tensors} declared" if tid >= n_tensors else
                                            "an input, a constant or written before" if defined[tid] else
                                            f"shaped {p.tensors[tid].shape}, without the batch (-1) first"))
            defined[tid] = True
    for i, tid in enumerate(p.outputs):
        if tid >= n_tensors or not defined[tid]:
            raise ProgramFormatError(f"code section: program output {i} is tensor {tid}, which is "
                                     + (f"beyond the {n_tensors} declared" if tid >= n_tensors
                                        else "never computed"))


def _check_overlaps(placed: list[tuple[int, int, int, int, int, str]], array_rows: int, array_cols: int) -> None:
    """No two tiles on one cell: per array, an occupancy map over the tiles' row and column
    boundaries (at most 2T x 2T for T tiles, and never more than one entry per cell), one
    slice per tile."""
    by_array: dict[int, list[tuple[int, int, int, int, int, str]]] = {}
    for tile in placed:
        by_array.setdefault(tile[0], []).append(tile)
    for array, tiles in by_array.items():
        if len(tiles) < 2:
            continue
        rows = np.unique([v for t in tiles for v in (t[1], t[1] + t[3])])
        cols = np.unique([v for t in tiles for v in (t[2], t[2] + t[4])])
        if rows.size * cols.size > (array_rows + 1) * (array_cols + 1):  # many small tiles: one entry per cell
            rows, cols = np.arange(array_rows + 1), np.arange(array_cols + 1)
        taken = np.zeros((rows.size, cols.size), dtype=bool)
        for _, row, col, height, width, where in tiles:
            r0, r1 = np.searchsorted(rows, (row, row + height))
            c0, c1 = np.searchsorted(cols, (col, col + width))
            region = taken[r0:r1, c0:c1]
            if region.any():
                raise ProgramFormatError(f"{where}: shares cells of array {array} with an earlier tile")
            region[...] = True


def check_cell_image(program: Program, layers: list[Layer] | None = None) -> None:
    """Every tile's packed cells (of ``layers``, default all) lie inside the program's cell image."""
    for layer in program.layers if layers is None else layers:
        for ti, t in enumerate(layer.tiles):
            size = packed_size(t.in_count * t.out_count * program.slices, program.cell_bits)
            if t.cells_offset + size > len(program.cells):
                raise ProgramFormatError(f"layer '{layer.name}' tile {ti}: cells at bytes {t.cells_offset}.."
                                         f"{t.cells_offset + size} are beyond the {len(program.cells)}-byte "
                                         f"cell image")


def _scale(data: bytes, out_features: int, name: str) -> float | np.ndarray:
    values = np.frombuffer(data, dtype="<f4")
    if values.size == 1:
        return float(values[0])
    if values.size != out_features:
        raise ProgramFormatError(f"code section: layer '{name}' has {values.size} scales, "
                                 f"expected 1 or {out_features}")
    return values.astype(np.float32)


# -- packed cell targets ------------------------------------------------------------
def pack_cells(targets: np.ndarray, cell_bits: int) -> bytes:
    """Pack K-bit cell states, 8/K per byte, first cell in the least significant bits."""
    per_byte = 8 // cell_bits
    flat = np.ascontiguousarray(targets, dtype=np.uint8).ravel()
    if cell_bits == 1:
        return np.packbits(flat, bitorder="little").tobytes()
    pad = (-flat.size) % per_byte
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    groups = flat.reshape(-1, per_byte)
    packed = groups[:, 0].copy()
    for i in range(1, per_byte):  # one pass per position in the byte, not one per cell
        packed |= groups[:, i] << np.uint8(i * cell_bits)
    return packed.tobytes()


def packed_size(count: int, cell_bits: int) -> int:
    per_byte = 8 // cell_bits
    return -(-count // per_byte)


@cache
def _unpack_table(cell_bits: int) -> np.ndarray:
    """Per byte value, its 8/K cells as the bytes of one little-endian integer (first cell lowest)."""
    per_byte = 8 // cell_bits
    byte = np.arange(256, dtype=np.uint64)
    cells = sum(((byte >> np.uint64(i * cell_bits)) & np.uint64((1 << cell_bits) - 1)) << np.uint64(8 * i)
                for i in range(per_byte))
    return cells.astype(f"<u{per_byte}")


def unpack_cells(data: bytes, offset: int, shape: tuple[int, ...], cell_bits: int) -> np.ndarray:
    count = int(np.prod(shape))
    raw = np.frombuffer(data, dtype=np.uint8, count=packed_size(count, cell_bits), offset=offset)
    if cell_bits == 1:
        cells = np.unpackbits(raw, count=count, bitorder="little")
    else:  # one table look-up per byte gives all its cells at once
        cells = _unpack_table(cell_bits).take(raw).view(np.uint8)[:count]
    return cells.reshape(shape)


# -- cells to weights -----------------------------------------------------------------
def effective_weights(program: Program, layer_index: int,
                      tile_conductance: Callable[[int], np.ndarray]) -> np.ndarray:
    """Combine the bit slices and the +/- arrays of a layer's tiles into one float matrix.

    ``tile_conductance(i)`` returns tile i's cells, shape (in_count, out_count * S).
    This is the digital shift-and-add the chip does on its partial sums; with ideal
    converters it is exact to apply it to the weights instead of to every product.
    """
    layer = program.layers[layer_index]
    s, k = program.slices, program.cell_bits
    place = (np.float64(2.0) ** (k * np.arange(s)))
    w = np.zeros((layer.in_features, layer.out_features), dtype=np.float64)
    for i, tile in enumerate(layer.tiles):
        g = tile_conductance(i).reshape(tile.in_count, tile.out_count, s)
        w[tile.in_start:tile.in_start + tile.in_count,
          tile.out_start:tile.out_start + tile.out_count] += tile.sign * (g @ place)
    return (w * np.asarray(layer.scale, dtype=np.float64)).astype(np.float32)
