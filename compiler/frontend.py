"""Loading, checking and normalising ONNX models before lowering.

Every defect is reported as a CompileError that names the file and, where there is
one, the node; nothing is sent to a chip for a model that fails here.

Normalising rewrites the model into the form the lowering expects, and the same form is
what ``quantized_model`` hands to onnxruntime, so the ideal chip and the reference see one
graph:

* opsets below 13 are converted to 13 with ``onnx.version_converter``;
* model-local functions are inlined;
* constant subgraphs (weights produced by Transpose/Reshape/Identity/Constant nodes, as
  the exporters emit them) are evaluated once with ``onnx.reference.ReferenceEvaluator``;
* shape arithmetic on activations (``Shape -> Gather -> Concat -> Reshape``, the way
  ``x.view(x.size(0), -1)`` exports) is evaluated with the batch size kept symbolic and
  becomes a constant Reshape whose first entry 0 copies the batch dimension;
* BatchNormalization after a Conv or Gemm whose weight nothing else uses is folded into
  that weight and bias.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from nvcim.firmware_emu.contract.program_format import MAX_SAMPLE_ELEMENTS

from . import batchnorm

NATIVE_OPSET = 13                 # older models are converted up to this opset
_BATCH = np.int64(-0x4E5643494D)  # stands for the batch size inside folded shape tensors
_SHAPE_MOVING = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity", "Reshape",
                 "Flatten"}       # ops that move shape entries without doing arithmetic on them
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}


class CompileError(ValueError):
    """The model cannot be compiled; the message names the file and the node."""


def load(model: str | os.PathLike | onnx.ModelProto, source: str | None = None) -> tuple[onnx.ModelProto, str]:
    """Read, check, convert, normalise and shape-infer a model; return it with a name for messages.

    ``source`` names an in-memory model in messages (default: its graph name).
    """
    if isinstance(model, onnx.ModelProto):
        source, proto = source or model.graph.name or "<model>", model
    else:
        source = str(model)
        path = Path(model)
        if not path.is_file():
            raise CompileError(f"{source}: no such ONNX file")
        try:
            proto = onnx.load(str(path))
        except (DecodeError, ValueError, RuntimeError, OSError) as e:
            raise CompileError(f"{source}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.graph.node:
        raise CompileError(f"{source}: not an ONNX model with a graph (no nodes found; is the file truncated?)")
    _check(proto, source)
    proto = _upgrade(proto, source)
    proto = _infer(proto, source)
    proto = fold_constants(proto, source)
    proto = fold_batchnorm(proto)
    return _infer(proto, source), source


def _check(proto: onnx.ModelProto, source: str) -> None:
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, UnicodeDecodeError) as e:  # a damaged file's text may not be UTF-8
        raise CompileError(f"{source}: invalid ONNX model: {_first_line(e)}") from None
    g = proto.graph
    names = [n.name for n in g.node] + [x for n in g.node for x in (*n.input, *n.output)] \
        + [v.name for v in (*g.input, *g.output, *g.initializer)]
    for name in names:  # protobuf hands a string field that is not UTF-8 over as bytes
        if not isinstance(name, str):
            raise CompileError(f"{source}: invalid ONNX model: name {name!r} is not valid UTF-8")


def _infer(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise CompileError(f"{source}: invalid ONNX model: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _upgrade(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Inline local functions and bring opsets below NATIVE_OPSET up to it."""
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    version = opset_of(proto)
    newest = onnx.defs.onnx_opset_version()
    if version > newest:
        raise CompileError(f"{source}: opset {version} is newer than the installed onnx supports ({newest})")
    if version >= NATIVE_OPSET:
        return proto
    proto = _fix_old_prelu(proto, version)
    try:
        proto = onnx.version_converter.convert_version(proto, NATIVE_OPSET)
    except Exception as e:  # the converter raises bare RuntimeErrors and more from C++
        raise CompileError(f"{source}: cannot convert opset {version} to {NATIVE_OPSET}: {_first_line(e)}") from None
    # initializers need not be graph inputs from IR 4 on; converted ops add some that are not
    proto.ir_version = max(proto.ir_version, helper.find_min_ir_version_for(list(proto.opset_import)))
    return _drop_initializer_inputs(proto)


def _drop_initializer_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Old models list every weight as a graph input too; to the chip they are constants."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in inits]
    if len(inputs) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
    return proto


def _fix_old_prelu(proto: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Before opset 7, a 1-D PRelu slope of C values applied per channel (axis 1); numpy
    broadcasting, used from opset 7 on, needs it shaped (C, 1, ..., 1)."""
    if version >= 7:
        return proto
    proto = _copy(proto)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in proto.graph.input}
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "PRelu" and node.input[1] in inits and node.input[0] in ranks:
            slope = numpy_helper.to_array(inits[node.input[1]])
            rank = ranks[node.input[0]]
            if slope.ndim == 1 and slope.size > 1 and rank > 2:
                shape = [slope.size] + [1] * (rank - 2)
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(slope.reshape(shape), node.input[1]))
                for value in proto.graph.input:  # IR 3 lists the slope as an input too
                    if value.name == node.input[1]:
                        value.CopyFrom(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type,
                                                                     shape))
    return proto


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {}
    for t in graph.initializer:
        try:
            out[t.name] = numpy_helper.to_array(t)
        except (ValueError, TypeError) as e:  # a damaged file: data that does not fill its dims
            raise CompileError(f"{graph.name or '<model>'}: initializer '{t.name}' cannot be read: "
                               f"{_first_line(e)}") from None
    return out


# attributes with a range of their own, by name: flags, counts and sizes (every float must be finite)
_FLAGS = {"transA", "transB", "ceil_mode", "count_include_pad", "keepdims", "noop_with_empty_axes", "allowzero",
          "training_mode", "select_last_index"}
_AT_LEAST_ONE = {"group", "kernel_shape", "strides", "dilations", "size", "num_outputs"}
_NOT_NEGATIVE = {"epsilon"}


def check_attributes(node: onnx.NodeProto, where: str) -> None:
    """CompileError naming ``where`` (the file and node) for an attribute no op takes: a
    non-finite float, a flag other than 0 or 1, a group, window, stride or size below 1, a
    negative epsilon. Lowering then only meets values its arithmetic is defined for."""
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        values = list(value) if a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS) else [value]
        if a.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS) and \
                not all(np.isfinite(v) for v in values):
            raise CompileError(f"{where}: attribute {a.name}={value} is not finite")
        if a.type not in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT):
            continue
        if a.name in _FLAGS and not all(v in (0, 1) for v in values):
            raise CompileError(f"{where}: attribute {a.name}={value}; a flag is 0 or 1")
        if a.name in _AT_LEAST_ONE and not all(v >= 1 for v in values):
            raise CompileError(f"{where}: attribute {a.name}={value}; it must be >= 1")
        if a.name in _NOT_NEGATIVE and not all(v >= 0 for v in values):
            raise CompileError(f"{where}: attribute {a.name}={value}; it must be >= 0")


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How messages name a node: its name, or its op and position when it has none."""
    return node.name or f"{node.op_type}#{index}"


def shapes_of(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Inferred shapes of every tensor the model describes; None for a dimension not known statically."""
    out = {}
    g = proto.graph
    for v in [*g.input, *g.value_info, *g.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


# -- constant folding -----------------------------------------------------------------
def _evaluate(node: onnx.NodeProto, values: list[np.ndarray | None], opsets: dict[str, int]) -> list[np.ndarray]:
    feeds = {name: v for name, v in zip(node.input, values) if name}
    return list(ReferenceEvaluator(node, opsets=opsets).run(None, feeds))


def fold_constants(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Evaluate every node whose inputs are constants, and shape arithmetic on activations.

    Shape(x) of an activation is [batch, d1, ...]: the batch entry is a marker value that
    may be moved (Gather, Concat, ...) but not computed with. A Reshape whose shape ends up
    with the marker first gets 0 there instead (copy the input's batch dimension).
    Folding a Reshape's shape lets shape inference see the dims after it, which a later
    Shape may need, so passes repeat until one changes nothing.
    """
    symbolic: set[str] = set()  # constants holding the batch marker, carried between passes
    while True:
        proto, changed, problems = _fold_pass(proto, source, symbolic)
        if not changed:
            break
        proto = _infer(proto, source)
    if problems:
        raise CompileError(problems[0])
    return proto


def _fold_pass(proto: onnx.ModelProto, source: str, symbolic: set[str]) -> tuple[onnx.ModelProto, bool, list[str]]:
    graph = proto.graph
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    consts = initializers(graph)
    initial = set(consts)
    shapes = shapes_of(proto)
    limit = max([MAX_SAMPLE_ELEMENTS] + [v.size for v in consts.values()])  # what a fold may produce
    kept: list[tuple[int, onnx.NodeProto]] = []
    problems: list[str] = []
    for index, node in enumerate(graph.node):
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" and inputs[0] not in consts:
            dims = shapes.get(inputs[0])
            if dims is None or any(d is None for d in dims[1:]):
                problems.append(f"{source}: node '{node_label(node, index)}' (Shape) reads the shape of "
                                f"'{inputs[0]}', whose dimensions are not all known statically")
                kept.append((index, node))
                continue
            full = np.array([_BATCH if dims[0] is None else dims[0], *dims[1:]], np.int64)
            value = full[_shape_slice(node, len(dims))]
            consts[node.output[0]] = value
            if _BATCH in value:
                symbolic.add(node.output[0])
            continue
        if node.op_type in _NEVER_FOLD or not all(i in consts for i in inputs) or node.domain not in ("", "ai.onnx"):
            kept.append((index, node))
            continue
        marked = any(i in symbolic for i in inputs)
        if marked and node.op_type not in _SHAPE_MOVING:
            kept.append((index, node))
            continue
        too_big = [(name, shapes[name]) for name in node.output if name in shapes
                   and None not in shapes[name] and math.prod(shapes[name]) > limit]
        if too_big:
            name, dims = too_big[0]
            raise CompileError(f"{source}: node '{node_label(node, index)}' ({node.op_type}) would fold into "
                               f"'{name}' of shape {dims}, more values than the model's largest weight or a "
                               f"chip's tensor ({limit})")
        try:
            results = _evaluate(node, [consts[i] for i in node.input if i], opsets)
        except Exception as e:  # the reference implementation raises whatever numpy raises
            raise CompileError(f"{source}: node '{node_label(node, index)}' ({node.op_type}) has constant inputs "
                               f"but cannot be evaluated: {_first_line(e)}") from None
        if marked and any(np.asarray(r).dtype != np.int64 for r in results):
            kept.append((index, node))  # the batch marker only means something as an int64 shape entry
            continue
        for name, value in zip(node.output, results):
            consts[name] = np.asarray(value)
            if marked and _BATCH in consts[name]:
                symbolic.add(name)
    changed = len(kept) != len(graph.node)

    new_inits: dict[str, np.ndarray] = {}
    for index, node in kept:
        for pos, name in enumerate(node.input):
            if name in symbolic:
                value = consts[name]
                if node.op_type == "Reshape" and pos == 1 and value.ndim == 1 and value[0] == _BATCH \
                        and _BATCH not in value[1:]:
                    fixed = value.copy()
                    fixed[0] = 0
                    node.input[pos] = f"{name}/batch_as_0"
                    new_inits[node.input[pos]] = fixed
                    _set_attr(node, "allowzero", 0)
                    changed = True
                    continue
                problems.append(f"{source}: node '{node_label(node, index)}' ({node.op_type}) uses '{name}', "
                                f"which is computed from the batch size; the chip compiles for any batch and "
                                f"can only keep it as the first dimension of a Reshape")
            if name in consts and name not in initial:
                new_inits[name] = consts[name]
    for out in graph.output:
        if out.name in consts:
            raise CompileError(f"{source}: graph output '{out.name}' is a constant; nothing for the chip to compute")

    folded = _copy(proto)
    del folded.graph.node[:]
    folded.graph.node.extend(node for _, node in kept)
    used = {i for _, n in kept for i in n.input} | {o.name for o in graph.output}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(keep_inits)
    folded.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k)
                                    for k, v in new_inits.items() if k in used)
    del folded.graph.value_info[:]
    return _prune(folded), changed, problems


def _shape_slice(node: onnx.NodeProto, rank: int) -> slice:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return slice(attrs.get("start", 0), attrs.get("end", rank))


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _prune(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes no graph output depends on, and initializers nothing uses."""
    graph = proto.graph
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    if len(live) != len(graph.node):
        del graph.node[:]
        graph.node.extend(live)
    inits = [t for t in graph.initializer if t.name in needed]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return proto


# -- BatchNormalization folding -------------------------------------------------------
def fold_batchnorm(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold BN into the Conv/Gemm before it where that weight and bias serve that node alone.

    The weight keeps its initializer name (so the crossbar layer keeps its name); the
    remaining BN nodes run on the digital unit as a per-channel scale and shift.
    """
    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {o: n for n in graph.node for o in n.output}
    removed = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        x = bn.input[0]
        prev = producer.get(x)
        if attrs.get("training_mode", 0) or prev is None or prev.op_type not in ("Conv", "Gemm") \
                or uses.get(x) != 1 or x in outputs or not all(n in consts for n in bn.input[1:5]):
            continue
        w_name = prev.input[1]
        b_name = prev.input[2] if len(prev.input) > 2 and prev.input[2] else None
        if w_name not in consts or uses.get(w_name) != 1 or (
                b_name and (b_name not in consts or uses.get(b_name) != 1)):
            continue
        pattrs = {a.name: helper.get_attribute_value(a) for a in prev.attribute}
        w = numpy_helper.to_array(consts[w_name]).astype(np.float64)
        gamma, beta, mean, var = (numpy_helper.to_array(consts[n]).astype(np.float64) for n in bn.input[1:5])
        channels = gamma.size
        # BN(alpha * x @ W + beta * C) = alpha * x @ (W * s) + ((beta * C - mean) * s + B)
        if prev.op_type == "Conv":
            axis = 0
            bias = numpy_helper.to_array(consts[b_name]).astype(np.float64) if b_name else np.zeros(channels)
        else:
            if pattrs.get("transA", 0):
                continue
            axis = 0 if pattrs.get("transB", 0) else 1
            c = numpy_helper.to_array(consts[b_name]).astype(np.float64) if b_name else np.zeros(1)
            if c.size not in (1, channels) or c.ndim > 2:
                continue
            bias = np.broadcast_to(c.reshape(-1) * pattrs.get("beta", 1.0), (channels,))
            _set_attr(prev, "beta", 1.0)
        if w.shape[axis] != channels or bias.shape != (channels,):
            continue
        w_folded, b_folded = batchnorm.fold(w, bias, gamma, beta, mean, var, attrs.get("epsilon", 1e-5), axis)
        dtype = numpy_helper.to_array(consts[w_name]).dtype
        consts[w_name].CopyFrom(numpy_helper.from_array(w_folded.astype(dtype), w_name))
        b_out = b_name or f"{w_name}/bn_bias"
        tensor = numpy_helper.from_array(b_folded.astype(dtype), b_out)
        if b_name:
            consts[b_name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            if len(prev.input) < 3:
                prev.input.append(b_out)
            else:
                prev.input[2] = b_out
        prev.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    return _prune(proto)
