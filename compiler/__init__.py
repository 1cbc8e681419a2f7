"""ONNX-to-crossbar compiler: ``compile_model(path, target) -> Program``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from firmware_emu.program_format import Layer, Program, pack_cells

from . import frontend, lower
from .frontend import CompileError
from .mapping import CapacityError, Placer
from .quantize import fake_quantize, quantize, slice_levels

__all__ = ["CompileError", "CapacityError", "Target", "compile_model", "lower_model", "place",
           "quantized_model"]


@dataclass(frozen=True)
class Target:
    """The chip a program is compiled for (what IDENTIFY reports)."""

    arrays: int = 256
    rows: int = 256
    cols: int = 256
    weight_bits: int = 8
    cell_bits: int = 2


def lower_model(model: str | os.PathLike | onnx.ModelProto, shared: str = "common",
                source: str | None = None) -> tuple[lower.Lowering, onnx.ModelProto]:
    """Check and lower a model without a chip in sight: every model error surfaces here."""
    if shared not in ("common", "separate"):
        raise ValueError(f"shared={shared!r}: expected 'common' or 'separate'")
    proto, source = frontend.load(model, source)
    graph = proto.graph
    unsupported = [(frontend.node_label(n, i), n.op_type) for i, n in enumerate(graph.node)
                   if n.op_type not in lower.HANDLERS]
    if unsupported:
        label, op = unsupported[0]
        raise CompileError(f"{source}: node '{label}' uses op {op}, which the chip does not support "
                           f"(supported: {', '.join(sorted(lower.HANDLERS))})")
    consts = frontend.initializers(graph)
    lo = lower.Lowering(source, consts, shared)
    for value in graph.input:
        if value.name not in consts:
            lo.tensor(value.name, frontend.static_shape(value, source))
    for i, node in enumerate(graph.node):
        lo.node, lo.label = node, frontend.node_label(node, i)
        lower.HANDLERS[node.op_type](lo, node)
    return lo, proto


def compile_model(model: str | os.PathLike | onnx.ModelProto, target: Target = Target(), *,
                  base: Program | None = None, shared: str = "common", source: str | None = None) -> Program:
    """Compile an ONNX model for ``target``.

    ``base``: the program already on the chip; its layers keep their tiles and cells
    (incremental mode) and new layers go into free columns only.
    ``shared``: a weight used by several nodes is placed once ("common") or per use ("separate").
    ``source``: how messages name an in-memory model (e.g. the file it came from).
    """
    return place(*lower_model(model, shared, source), target, base=base)


def place(lo: lower.Lowering, proto: onnx.ModelProto, target: Target, *, base: Program | None = None) -> Program:
    """Quantise, slice and place a lowered model's weight layers onto ``target``."""
    slices = target.weight_bits // target.cell_bits
    placer = Placer(target.rows, target.cols, slices)
    pinned = {layer.name: layer for layer in (base.layers if base else [])}
    if base is not None:
        if (base.weight_bits, base.cell_bits, base.array_rows, base.array_cols) != \
                (target.weight_bits, target.cell_bits, target.rows, target.cols):
            raise CompileError(f"{lo.source}: base program was compiled for another chip geometry")
        for layer in base.layers:
            for tile in layer.tiles:
                placer.reserve(tile)

    layers: list[Layer] = []
    cells: list[bytes] = []
    offset = 0
    for name, w in lo.weights.items():
        q = quantize(w, target.weight_bits)
        states = slice_levels(q.levels, target.weight_bits, target.cell_bits)
        old = pinned.get(name)
        if old is not None:
            tiles = [type(t)(**vars(t)) for t in old.tiles]
        else:
            tiles = [placer.place(sign, block)
                     for sign in (1, -1)
                     for block in placer.blocks(*w.shape)
                     if _has_sign(q.signs, block, sign)]
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
        if old is not None and (old.in_features, old.out_features) != w.shape:
            raise CompileError(f"{lo.source}: layer '{name}' is pinned with shape "
                               f"{old.in_features}x{old.out_features}, the model has {w.shape[0]}x{w.shape[1]}")
        layers.append(Layer(name, w.shape[0], w.shape[1], q.scale, tiles))
    if placer.arrays_needed > target.arrays:
        raise CapacityError(f"{lo.source}: the model needs {placer.arrays_needed} arrays of "
                            f"{target.rows}x{target.cols} cells; the chip has {target.arrays}")
    graph_outputs = [lo.ids_for(o.name) for o in proto.graph.output]
    graph_inputs = [lo.ids[v.name] for v in proto.graph.input if v.name not in lo.consts]
    return Program(target.weight_bits, target.cell_bits, target.rows, target.cols,
                   lo.tensors, lo.constants, layers, lo.instructions, graph_inputs, graph_outputs,
                   b"".join(cells))


def _has_sign(signs: np.ndarray, block: tuple[int, int, int, int], sign: int) -> bool:
    i, ni, o, no = block
    return bool((signs[i:i + ni, o:o + no] == sign).any())


def _match(layer: Layer, tile):
    return next(t for t in layer.tiles if (t.sign, t.in_start, t.out_start) == (tile.sign, tile.in_start, tile.out_start))


def quantized_model(model: str | os.PathLike | onnx.ModelProto, weight_bits: int = 8) -> onnx.ModelProto:
    """The model with every crossbar weight replaced by its quantised value.

    onnxruntime on this model is what an ideal chip (sigma = 0) must reproduce.
    """
    lo, proto = lower_model(model)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    sources = set(lo.weight_sources.values())
    for init in out.graph.initializer:
        if init.name in sources:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(fake_quantize(w, weight_bits).astype(w.dtype), init.name))
    return out
