"""docs/program-format.md, rendered from the program format's construct declarations and the op table.

The field lists, offsets, sizes and primitive types come from the ``*Struct`` declarations
in ``contract/program_format.py``; the opcode tables from ``contract/ops.OPS``. What
cannot be read off a declaration (what a field means, the layout of the variable-length
records, the prose around the tables) is written here, and rendering refuses a struct
whose declared fields and documented fields differ, so the page cannot describe a field
that is not there or miss one that is. ``python -m nvcim.firmware_emu.datasheet`` writes
it with the rest of the datasheet.
"""

from __future__ import annotations

from construct import Const, FormatField, Struct

from .contract.ops import OPS, Attr, OpSpec
from .contract.program_format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    CodeStruct,
    ConstantStruct,
    HeaderStruct,
    InstrStruct,
    LayerStruct,
    TensorStruct,
    TileStruct,
)

SOURCES = "firmware_emu/contract/program_format.py and firmware_emu/contract/ops.py"
_PRIMITIVES = {"<B": "u8", "<H": "u16", "<L": "u32", "<b": "i8", "<l": "i32", "<q": "i64", "<f": "f32"}

# What each field means, in declaration order. Fixed-size structs: field -> meaning (offset,
# size and type are read off the declaration). Variable-length ones: field -> (type, meaning).
_HEADER = {
    "magic": f"`{MAGIC.decode()}`",
    "version": f"format version, {FORMAT_VERSION} (1 had one float scale per layer and 4 opcodes)",
    "weight_bits": "M, bits per weight magnitude (8)",
    "cell_bits": "K, bits per cell (2); S = M / K cells (\"slices\") per weight",
    "array_rows": "rows of one crossbar array the program was placed for",
    "array_cols": "columns of one array",
    "arrays_used": "1 + the highest array index any tile uses",
    "code_size": "bytes of the code section",
    "code_crc": "CRC-32 of the code section",
    "cells_size": "bytes of the cell image",
    "cells_crc": "CRC-32 of the cell image",
}
_TILE = {
    "sign": "+1: the positive array of the differential pair, -1: the negative one",
    "array": "array index on the chip",
    "row": "first row used",
    "col": "first column used",
    "in_start": "first row of W in this tile",
    "in_count": "rows of W in this tile (<= array_rows)",
    "out_start": "first column of W in this tile",
    "out_count": "columns of W in this tile (out_count * S <= array_cols)",
    "cells_offset": "byte offset of this tile's image in the cell image",
}
_CODE = {
    "tensors": ("u32 count, then `TensorStruct` each", "every value the program names; its index is its tensor id"),
    "constants": ("u32 count, then `ConstantStruct` each",
                  "values of constant tensors (biases, BN scales, reshaped constants)"),
    "layers": ("u32 count, then `LayerStruct` each", "crossbar weight matrices and their tiles; index = layer id"),
    "instructions": ("u32 count, then `InstrStruct` each", "executed in order"),
    "inputs": ("u32[n: u16]", "tensor ids fed by the host, in RUN's staging order"),
    "outputs": ("u32[n: u16]", "tensor ids returned by RUN, in order"),
}
_TENSOR = {
    "name": ("String", "the ONNX value name (or a derived one such as `y/bias`)"),
    "shape": ("i32[n: u8]", "ONNX layout; -1 marks the batch dimension, always dim 0 of activations"),
}
_CONSTANT = {
    "tensor": ("u32", "tensor id"),
    "data": ("u32 byte count, then bytes", "float32 little-endian, C order, `prod(shape)` values"),
}
_LAYER = {
    "name": ("String", ("the initializer the weight came from: `conv1.weight`; a grouped convolution's groups are "
                        "`W/group0`, `W/group1`, ...; with `shared=\"separate\"` a weight used by several nodes gets "
                        "one copy per node, `W@node`")),
    "in_features": ("u32", "rows of W (crossbar inputs)"),
    "out_features": ("u32", "columns of W (outputs)"),
    "scales": ("u32 byte count, then float32 LE", ("weight value of one level: 1 value (per-tensor quantisation, "
                                                   "the default) or `out_features` values (`per_channel=True`)")),
    "tiles": ("u32 count, then `TileStruct` each", "where the blocks of W live"),
}
_INSTR = {
    "op": ("u16", "`Opcode` (table below)"),
    "name": ("String", "the ONNX node it came from (for messages and the disassembly)"),
    "layer": ("i32", "layer id for crossbar ops, -1 otherwise"),
    "inputs": ("u32[n: u8]", "tensor ids"),
    "outputs": ("u32[n: u8]", "tensor ids"),
    "attrs": ("u8 count, then `AttrStruct` each", "named parameters (see the attribute table below)"),
}


def _fields(struct: Struct, documented: dict, what: str) -> list[str]:
    declared = [sc.name for sc in struct.subcons]
    if declared != list(documented):
        raise ValueError(f"{what}: declared fields {declared} but documented {list(documented)}")
    return declared


def fixed_struct_table(struct: Struct, meanings: dict[str, str], what: str) -> list[str]:
    """offset | size | type | field | meaning, read off a fixed-size struct."""
    _fields(struct, meanings, what)
    rows = ["| offset | size | type | field | meaning |", "|---:|---:|---|---|---|"]
    offset = 0
    for sc in struct.subcons:
        inner = sc.subcon
        if isinstance(inner, Const):
            kind = "bytes"
        elif isinstance(inner, FormatField):
            kind = _PRIMITIVES[inner.fmtstr]
        else:
            raise TypeError(f"{what}.{sc.name}: not a fixed-size primitive")
        rows.append(f"| {offset} | {sc.sizeof()} | {kind} | `{sc.name}` | {meanings[sc.name]} |")
        offset += sc.sizeof()
    return rows


def record_table(struct: Struct, documented: dict[str, tuple[str, str]], what: str) -> list[str]:
    """field | type | meaning for a variable-length record."""
    _fields(struct, documented, what)
    return ["| field | type | meaning |", "|---|---|---|",
            *(f"| `{name}` | {kind} | {meaning} |" for name, (kind, meaning) in documented.items())]


def _attrs(spec: OpSpec) -> str:
    return ", ".join(f"`{a.name}`" for a in spec.attrs) or "-"


def _attr_row(spec: OpSpec, a: Attr) -> str:
    default = "" if a.onnx_default is None else f" (ONNX default {a.onnx_default:.17g})"
    return f"| {spec.name} | `{a.name}` | {a.type} | {a.meaning}{default} |"


def _opcode_tables() -> list[str]:
    rows = ["| code | name | unit | inputs | attrs | output shape | computes | from ONNX |",
            "|---:|---|---|---|---|---|---|---|"]
    for spec in OPS.values():
        rows.append(f"| {int(spec.opcode)} | {spec.name} | {spec.unit} | {spec.inputs} | {_attrs(spec)} | "
                    f"{spec.shape} | {spec.computes} | {', '.join(spec.onnx)} |")
    rows += ["", "### Attributes", "",
             "Attribute types: *int* and *float* hold one value, *ints* a list; every attribute",
             "of an opcode is present in every instruction of it.", "",
             "| opcode | attribute | type | meaning |", "|---|---|---|---|",
             *(_attr_row(spec, a) for spec in OPS.values() for a in spec.attrs)]
    return rows


def render_program_format() -> str:
    """The program-format chapter of the datasheet."""
    tile_size = TileStruct.sizeof()
    out = [
        f"<!-- Generated by `python -m nvcim.firmware_emu.datasheet` from {SOURCES}; do not edit. -->",
        "",
        f"# The nvcim program format (version {FORMAT_VERSION})",
        "",
        "A program is what `compiler.compile_model` emits and the chip loads. It is declared once,",
        "with construct, in `firmware_emu/contract/program_format.py`, and what each opcode means",
        "in the op table `firmware_emu/contract/ops.py`; this page is rendered from both. All",
        "integers are little-endian.",
        "",
        "```",
        "+-------------------+  offset 0",
        f"| header ({HEADER_SIZE - 4} bytes) |",
        f"| header CRC-32     |  offset {HEADER_SIZE - 4}",
        f"+-------------------+  offset {HEADER_SIZE} = HEADER_SIZE",
        "| code section      |  code_size bytes: tensors, constants, layers + tiles, instructions",
        f"+-------------------+  offset {HEADER_SIZE} + code_size",
        "| cell image        |  cells_size bytes: every tile's target cell states, packed",
        "+-------------------+",
        "```",
        "",
        "The two sections carry their own CRC-32 (zlib's CRC-32, the same as `binascii.crc32`), so",
        "the code can be replaced without touching the cells and vice versa: the driver uploads",
        "the code section alone with `PROGRAM_LOAD` (which checks its CRC) and writes cells tile by",
        "tile with `CELLS_WRITE`; a reflash of a few layers (TSB) rewrites only their cells.",
        "`Program.to_bytes()` / `Program.from_bytes()` write and read the whole file; parsing",
        "reports every defect with its byte offset (bad magic, header CRC, a truncated or corrupt",
        "section, a version this code does not run).",
        "",
        f"## Header (`HeaderStruct`, {HEADER_SIZE - 4} bytes, then a 4-byte CRC)",
        "",
        *fixed_struct_table(HeaderStruct, _HEADER, "HeaderStruct"),
        f"| {HEADER_SIZE - 4} | 4 | u32 | (header CRC) | CRC-32 of bytes 0..{HEADER_SIZE - 5} |",
        "",
        "A chip refuses a program whose geometry (`weight_bits`, `cell_bits`, `array_rows`,",
        "`array_cols`) differs from its own; `PROGRAM_LOAD` checks the staged code against the",
        "chip's header fields.",
        "",
        "## Code section (`CodeStruct`)",
        "",
        "Variable-length records, in this order. `String` is a u16 byte count then UTF-8 text.",
        "\"u32[n: u8]\" is a u8 count followed by that many u32 values.",
        "",
        *record_table(CodeStruct, _CODE, "CodeStruct"),
        "",
        "### `TensorStruct`",
        "",
        *record_table(TensorStruct, _TENSOR, "TensorStruct"),
        "",
        "Constants have their real shape (no batch dimension). Every other dimension is static:",
        "the chip is compiled for one input size and any batch.",
        "",
        "### `ConstantStruct`",
        "",
        *record_table(ConstantStruct, _CONSTANT, "ConstantStruct"),
        "",
        "Bulk data is raw bytes read with numpy, not construct arrays (construct parses arrays at",
        "~2.4 M elements/s; `Bytes` + numpy is ~1000x faster).",
        "",
        "### `LayerStruct`",
        "",
        *record_table(LayerStruct, _LAYER, "LayerStruct"),
        "",
        "A layer holds W with shape (in_features, out_features) and computes `x @ W`. The weight",
        "the chip holds is `sign * level * scale` with `level = sum_j t_j * 2^(jK)` (docs/device-model.md);",
        "`program_format.effective_weights` combines a layer's tiles into W this way.",
        "",
        f"### `TileStruct` ({tile_size} bytes)",
        "",
        *fixed_struct_table(TileStruct, _TILE, "TileStruct"),
        "",
        "**Tile convention.** A tile places the block `W[in_start : in_start+in_count,",
        "out_start : out_start+out_count]` of one sign at rows `[row, row+in_count)` and columns",
        "`[col, col+out_count*S)` of one array: crossbar inputs drive rows, outputs come off",
        "columns. Cell `(r, o*S + j)` of the tile holds slice j (bits `[jK, (j+1)K)` of the level)",
        "of weight `(in_start + r, out_start + o)` if that weight has the tile's sign, else 0.",
        "Weights of level 0 are 0 on both sides. A block with no weight of a sign has no tile for",
        "that sign (its cells stay erased).",
        "",
        "**Placement** (compiler/mapping.py): W is cut into blocks of at most `array_rows` rows and",
        "`array_cols // S` columns; tiles go first-fit onto a skyline: each array keeps, per",
        "S-cell-wide column group, the first row below the tiles already there, and a tile goes to",
        "the first array, and there the leftmost columns, where it fits below them. Small layers",
        "stack down an array (the 64x300 layer of the demo MLP takes 3 arrays instead of 10 with",
        "full-height column strips). Placement is deterministic. In incremental mode",
        "(`compile_model(..., base=)`) every layer of the base program keeps its tiles and cell",
        "bytes exactly, and raises the skyline over its columns, so new tiles never touch its cells.",
        "",
        "### `InstrStruct`",
        "",
        *record_table(InstrStruct, _INSTR, "InstrStruct"),
        "",
        "`AttrStruct`: `name` (u8 byte count + UTF-8), `ints` (i64[n: u8]), `floats`",
        "(f32[n: u8]); an attribute uses one of the two lists.",
        "",
        "## Cell image",
        "",
        "The concatenation of every tile's image, in layer then tile order; a tile's image starts",
        "at its `cells_offset`. An image is the tile's `in_count x (out_count * S)` target states,",
        "row-major, packed K bits per cell, `8 / K` cells per byte, the first cell in the least",
        "significant bits (2-bit cells: 4 per byte, `cells [1, 2, 3, 0]` pack to `0b00111001`). An",
        "image ends on a byte boundary (`ceil(cells * K / 8)` bytes). `Program.tile_cells(tile)`",
        "unpacks one tile.",
        "",
        "## Opcodes",
        "",
        "Activations are float32 in ONNX layout with the batch first (N); S are the spatial axes.",
        "Binary ops broadcast as numpy does. \"pads\" lists all begins then all ends. Each opcode's",
        "reference kernel in `contract/ops.py` is its definition; the emulator's interpreter and its",
        "onnxruntime graph, and the compiler's shape rule, all run from the same table.",
        "",
        *_opcode_tables(),
        "",
        "No op mixes the batch dimension with another: the compiler refuses a model that would",
        "(a Transpose moving dim 0, a Reshape folding the batch into features, a Concat or Softmax",
        "over dim 0, a constant spanning the batch).",
        "",
        "## How ONNX maps onto this",
        "",
        "- Gemm and MatMul with a constant right operand become MATMUL (+ ADD for a bias). Gemm's",
        "  `alpha` is folded into W, `transB` into its layout.",
        "- Conv becomes CONV on `group` layers (+ ADD of a (C_out, 1, ...) bias). One layer per",
        "  group rather than a block-diagonal matrix: a depthwise conv then needs",
        "  C x (kernel x 1) tiles, not a (C * kernel) x C matrix that is almost all zeros.",
        "- BatchNormalization after a Conv or Gemm whose weight and bias serve that node alone is",
        "  folded into them (the weight keeps its initializer name); otherwise it runs as MUL by a",
        "  per-channel scale and ADD of a per-channel shift.",
        "- ConvTranspose becomes zero insertion (RESHAPE, PAD, RESHAPE; a SLICE where the pads",
        "  exceed the kernel's reach) and a CONV with the kernel flipped and its channel axes",
        "  swapped: an ordinary crossbar convolution (converters, noise, verify and TSB apply as",
        "  to any), at the price of the zero rows a strided one drives, rather than a crossbar op",
        "  of its own with a col2im scatter.",
        "- Gather from a constant table by integer indices (an embedding) becomes ONE_HOT and a",
        "  MATMUL: the table is a crossbar layer whose rows the one-hot inputs select, so it is",
        "  stored, quantised and verified like any weight instead of in digital memory (which a",
        "  large table would not fit). The host sends the indices as float32 (exact below 2^24).",
        "- Identity, Dropout (inference; an unused mask output is dropped) and Cast to float are",
        "  aliases and emit nothing; Flatten, Squeeze and Unsqueeze become RESHAPE; Sum a chain of",
        "  ADDs.",
        "- A graph input whose dim 0 is no batch (fixed beside a symbolic batch, or in a fixed-shape",
        "  model whose graph mixes dim 0 with the other dims) gets a batch axis in front, each",
        "  sample a copy of the input; only elementwise ops take it.",
        "- Quantisation is per ONNX weight tensor: the layers of a grouped conv share one scale,",
        "  and so do the column parts of a layer split over several chips.",
    ]
    return "\n".join(out) + "\n"
