"""ONNX-to-crossbar compiler: ``compile_model(path, target) -> Program``."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
from onnx import numpy_helper

from nvcim.firmware_emu.contract.geometry import Geometry
from nvcim.firmware_emu.contract.program_format import MAX_RANK, MAX_SAMPLE_ELEMENTS, Layer, Program, Tile, pack_cells

from . import frontend, lower, partition
from .frontend import CompileError
from .mapping import CapacityError, Placer
from .quantize import Quantized, fake_quantize, quantize, slice_levels

__all__ = ["CompileError", "CapacityError", "Target", "compile_model", "lower_model", "place",
           "quantized_model"]


Target = Geometry  # the chip a program is compiled for: its geometry, as IDENTIFY reports it
_DEFAULT_TARGET = Target()  # frozen, so one shared default is safe


def lower_model(model: str | os.PathLike | onnx.ModelProto, shared: str = "common",
                source: str | None = None) -> tuple[lower.Lowering, onnx.ModelProto]:
    """Check, normalise and lower a model without a chip in sight: every model error surfaces here.

    Returns the lowering and the normalised model it was lowered from.
    """
    if shared not in ("common", "separate"):
        raise ValueError(f"shared={shared!r}: expected 'common' or 'separate'")
    proto, source = frontend.load(model, source)
    graph = proto.graph
    unsupported = [(frontend.node_label(n, i), n.op_type, n.domain) for i, n in enumerate(graph.node)
                   if n.op_type not in lower.HANDLERS or n.domain not in ("", "ai.onnx")]
    if unsupported:
        label, op, domain = unsupported[0]
        op = f"{domain}::{op}" if domain not in ("", "ai.onnx") else op
        raise CompileError(f"{source}: node '{label}' uses op {op}, which the chip does not support "
                           f"(supported: {', '.join(sorted(lower.HANDLERS))})")
    consts = frontend.initializers(graph)
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    inputs = [v for v in graph.input if v.name not in consts]
    shapes = [_input_shape(v, source, [n for n in graph.node if v.name in n.input]) for v in inputs]
    # the batch is dim 0 where the shape names it (symbolic); inputs of fixed shape beside
    # such ones hold no batch. In a model of fixed shapes, dim 0 is taken as the batch unless
    # the graph then mixes it with the other dims: then no input holds one.
    symbolic = {v.name for v, dims in zip(inputs, shapes) if dims[0] is None}
    try:
        lo = _lower(proto, source, consts, shared, uses, inputs, shapes, unbatched=set() if not symbolic else
                    {v.name for v in inputs if v.name not in symbolic})
    except lower.BatchMixingError as first:
        if symbolic or not inputs:
            raise
        try:
            lo = _lower(proto, source, consts, shared, uses, inputs, shapes, unbatched={v.name for v in inputs})
        except CompileError:
            raise first from None
    return lo, proto


def _lower(proto: onnx.ModelProto, source: str, consts: dict, shared: str, uses: dict[str, int],
           inputs: list[onnx.ValueInfoProto], shapes: list[list[int | None]], unbatched: set[str]) -> lower.Lowering:
    """Lower the graph, the inputs named in ``unbatched`` holding no batch dimension."""
    batch = {dims[0] for v, dims in zip(inputs, shapes) if v.name not in unbatched}
    lo = lower.Lowering(source, consts, shared, uses, batch.pop() if len(batch) == 1 and None not in batch else None)
    lo.graph_outputs = {o.name for o in proto.graph.output}
    for value, dims in zip(inputs, shapes):
        if value.name in unbatched:
            lo.replicated.add(lo.tensor(value.name, (-1, *dims)))
        else:
            lo.tensor(value.name, (-1, *dims[1:]))
    for i, node in enumerate(proto.graph.node):
        lo.node, lo.label = node, frontend.node_label(node, i)
        where = f"{source}: node '{lo.label}' ({node.op_type})"
        frontend.check_attributes(node, where)
        try:
            lower.check_replicated(lo, node)
            lower.HANDLERS[node.op_type](lo, node)
        except CompileError:
            raise
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError, AttributeError) as e:
            # an input or attribute of a form the handler does not check for (a tensor where a
            # scalar belongs, an index past a list): still named by its node, never a traceback
            raise CompileError(f"{where}: cannot be lowered: {type(e).__name__}: {e}") from None
    return lo


INDEX_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})  # integer inputs: Gather indices


def _input_shape(value: onnx.ValueInfoProto, source: str, consumers: list[onnx.NodeProto]) -> list[int | None]:
    """A graph input's dims, batch (dim 0) None when symbolic; every other dim must be fixed.

    Inputs are float32, but for integer indices into a constant table (Gather's second
    input and nothing else): the host sends those as float32, exact below 2^24.
    """
    t = value.type.tensor_type
    indices = t.elem_type in INDEX_TYPES and consumers and \
        all(n.op_type == "Gather" and list(n.input).index(value.name) == 1 for n in consumers)
    if t.elem_type != onnx.TensorProto.FLOAT and not indices:
        kind = onnx.TensorProto.DataType.Name(t.elem_type) if t.elem_type else "non-tensor"
        raise CompileError(f"{source}: input '{value.name}' is {kind}; the chip takes float32 inputs "
                           f"(integer inputs only as the indices of a Gather from a constant table)")
    dims = t.shape.dim
    if not dims:
        raise CompileError(f"{source}: input '{value.name}' has no batch dimension (rank 0)")
    out: list[int | None] = [dims[0].dim_value if dims[0].HasField("dim_value") else None]
    for i, d in enumerate(dims[1:], start=1):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            label = d.dim_param or "unknown"
            raise CompileError(f"{source}: input '{value.name}' has dynamic dimension {i} ('{label}'); "
                               f"only the batch dimension (0) may vary on the chip")
        out.append(d.dim_value)
    if len(out) > MAX_RANK or math.prod(out[1:]) > MAX_SAMPLE_ELEMENTS:
        raise CompileError(f"{source}: input '{value.name}' has shape {_dims(out)}; the chip takes at most "
                           f"{MAX_RANK} axes and {MAX_SAMPLE_ELEMENTS} values per sample")
    return out


def _dims(dims: list[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def compile_model(model: str | os.PathLike | onnx.ModelProto, target: Target = _DEFAULT_TARGET, *,
                  base: Program | None = None, shared: str = "common", per_channel: bool = False,
                  source: str | None = None, pairs: bool = False, own_arrays: bool = False) -> Program:
    """Compile an ONNX model for ``target``.

    ``base``: the program already on the chip; its layers keep their tiles and cells
    (incremental mode) and new layers go into free columns only.
    ``shared``: a weight used by several nodes is placed once ("common") or per use ("separate").
    ``per_channel``: one quantisation scale per output channel instead of per tensor.
    ``source``: how messages name an in-memory model (e.g. the file it came from).
    ``pairs``: paired placement for a chip in differential readout (``mapping.Placer``).
    ``own_arrays``: with ``base``, new layers go to arrays no base tile uses (through finite
    converters a tile shares its array's ADC range with every other tile there).
    """
    return place(*lower_model(model, shared, source), target, base=base, per_channel=per_channel, pairs=pairs,
                 own_arrays=own_arrays)


def _quantize_layers(lo: lower.Lowering, weight_bits: int, per_channel: bool) -> dict[str, Quantized]:
    """Quantise every layer; the layers of one family (a grouped conv's groups) share one tensor scale."""
    out = {}
    for family in lo.families:
        peak = max(float(np.abs(lo.weights[name]).max(initial=0.0)) for name in family)
        for name in family:
            w = lo.weights[name]
            out[name] = quantize(w, weight_bits, channel_axis=1) if per_channel else \
                quantize(w, weight_bits, wmax=peak)
    return out


def place(lo: lower.Lowering, proto: onnx.ModelProto, target: Target, *, base: Program | None = None,
          per_channel: bool = False, inputs: list[str] | None = None, outputs: list[str] | None = None,
          quantized: dict[str, Quantized] | None = None, pairs: bool = False, own_arrays: bool = False) -> Program:
    """Quantise, slice and place a lowered model's weight layers onto ``target``.

    ``inputs`` / ``outputs``: the tensors the program takes and returns (default: the
    model's graph inputs and outputs; one stage of a partitioned model names its own).
    ``quantized``: the layers already quantised (a stage of a partitioned model: its
    layers keep the scales of the whole model's tensors).
    ``pairs``: each block's positive and negative tiles at one spot of an array pair (2p, 2p+1),
    as a chip in differential readout (ARRAY_CONVERTERS.DIFFERENTIAL) needs them.
    ``own_arrays``: with ``base``, new layers only on arrays no base tile uses.
    """
    slices = target.weight_bits // target.cell_bits
    placer = Placer(target.rows, target.cols, slices, pairs)
    pinned = {layer.name: layer for layer in (base.layers if base else [])}
    if base is not None:
        if (base.weight_bits, base.cell_bits, base.array_rows, base.array_cols) != \
                (target.weight_bits, target.cell_bits, target.rows, target.cols):
            raise CompileError(f"{lo.source}: base program was compiled for another chip geometry")
        for layer in base.layers:
            for tile in layer.tiles:
                placer.reserve(tile)
        if own_arrays:                       # new layers on arrays of their own: every base array taken
            placer.fill({t.array for layer in base.layers for t in layer.tiles})

    for name, w in lo.weights.items():
        old = pinned.get(name)
        if old is not None and (old.in_features, old.out_features) != w.shape:
            raise CompileError(f"{lo.source}: layer '{name}' is pinned with shape "
                               f"{old.in_features}x{old.out_features}, the model has {w.shape[0]}x{w.shape[1]}")
    if quantized is None:
        quantized = _quantize_layers(lo, target.weight_bits, per_channel)
    placed: dict[str, list[Tile]] = {}  # every tile placed (cheap) before any is sliced and packed (costly)
    for name, w in lo.weights.items():
        old = pinned.get(name)
        placed[name] = [Tile(**vars(t)) for t in old.tiles] if old is not None else \
            placer.place_layer([(sign, block) for sign in (1, -1) for block in placer.blocks(*w.shape)
                                if _has_sign(quantized[name].signs, block, sign)])
    if placer.arrays_needed > target.arrays:
        raise CapacityError(f"{lo.source}: the model needs {placer.arrays_needed} arrays of "
                            f"{target.rows}x{target.cols} cells; the chip has {target.arrays}"
                            + ("" if base is not None else partition.chips_hint(lo, target, quantized)))
    layers: list[Layer] = []
    cells: list[bytes] = []
    offset = 0
    for name, w in lo.weights.items():
        q = quantized[name]
        states = slice_levels(q.levels, target.weight_bits, target.cell_bits)
        old = pinned.get(name)
        tiles = placed[name]
        for tile in tiles:
            block = (slice(tile.in_start, tile.in_start + tile.in_count),
                     slice(tile.out_start, tile.out_start + tile.out_count))
            on_side = (q.signs[block] == tile.sign)[..., None]
            data = pack_cells(np.where(on_side, states[block], 0).reshape(tile.in_count, -1), target.cell_bits)
            if old is not None and data != base.tile_cells_bytes(_match(old, tile)):
                raise CompileError(f"{lo.source}: layer '{name}' is pinned on the chip by the base program, "
                                   f"but its weights changed; recompile without base to move it")
            tile.cells_offset = offset
            cells.append(data)
            offset += len(data)
        if old is not None and _has_unplaced_side(q.signs, tiles):
            raise CompileError(f"{lo.source}: layer '{name}' is pinned on the chip by the base program, "
                               f"but its weights changed sign; recompile without base to move it")
        scale = q.scale if np.ndim(q.scale) == 0 else np.asarray(q.scale, np.float32).reshape(-1)
        layers.append(Layer(name, w.shape[0], w.shape[1], scale, tiles))
    if outputs is None:
        outputs = [o.name for o in proto.graph.output]
    if inputs is None:
        inputs = [v.name for v in proto.graph.input if v.name not in lo.consts]
    graph_outputs = [lo.ids_for(name) for name in outputs]
    graph_inputs = [lo.ids[name] for name in inputs]
    return Program(target.weight_bits, target.cell_bits, target.rows, target.cols,
                   lo.tensors, lo.constants, layers, lo.instructions, graph_inputs, graph_outputs,
                   b"".join(cells))


def _has_sign(signs: np.ndarray, block: tuple[int, int, int, int], sign: int) -> bool:
    i, ni, o, no = block
    return bool((signs[i:i + ni, o:o + no] == sign).any())


def _has_unplaced_side(signs: np.ndarray, tiles: list[Tile]) -> bool:
    """Whether some weight's sign has no tile covering it (a pinned layer whose signs changed)."""
    covered = np.zeros(signs.shape, dtype=bool)
    for t in tiles:
        block = (slice(t.in_start, t.in_start + t.in_count), slice(t.out_start, t.out_start + t.out_count))
        covered[block] |= signs[block] == t.sign
    return bool(((signs != 0) & ~covered).any())


def _match(layer: Layer, tile: Tile) -> Tile:
    return next(t for t in layer.tiles
                if (t.sign, t.in_start, t.out_start) == (tile.sign, tile.in_start, tile.out_start))


def quantized_model(model: str | os.PathLike | onnx.ModelProto, weight_bits: int = 8, *,
                    per_channel: bool = False) -> onnx.ModelProto:
    """The normalised model with every crossbar weight replaced by its quantised value.

    onnxruntime on this model is what an ideal chip (sigma = 0) must reproduce: it is the
    graph the chip was compiled from (constants and BatchNorm folded) with the weights the
    cells hold.
    """
    lo, proto = lower_model(model)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        axis = lo.channel_axes.get(init.name)
        if axis is not None:
            w = numpy_helper.to_array(init)
            q = fake_quantize(w, weight_bits, axis if per_channel else None)
            init.CopyFrom(numpy_helper.from_array(q.astype(w.dtype), init.name))
    return out
