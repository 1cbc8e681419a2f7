"""Lowering ONNX nodes to chip instructions.

Weight layers become crossbar work: Gemm and MatMul with a constant weight a MATMUL, Conv
a CONV whose kernel is laid out im2col-style as one matrix per group, of shape
(C_in/group * prod(kernel), C_out/group) with rows in (channel, kernel offset) order, so a
grouped or depthwise convolution is ``group`` small layers rather than one mostly-zero
block-diagonal matrix. Everything else runs on the chip's digital unit.

Each handler checks the node's attributes and emits instructions into the Lowering.
Which opcode an ONNX operator becomes and what its attributes are come from the
contract's op table (``contract.ops``). Output shapes are not worked out by hand:
``Lowering.emit`` applies the table's shape rule, which runs the op's reference kernel on
a batch of one (zeros, or the constants themselves), so the compiler and the chip cannot
disagree about a shape, and an op that would move the batch dimension is caught where it
happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from nvcim.firmware_emu.contract.ops import OPS, PAD_MODES, by_onnx, output_shapes
from nvcim.firmware_emu.contract.program_format import MAX_SAMPLE_ELEMENTS, Instr, Opcode, TensorDecl, kernel_elements

from .frontend import CompileError


class BatchMixingError(CompileError):
    """An op would mix the batch dimension (dim 0) with the others: for a model of fixed
    shapes, the sign that its dim 0 is no batch."""


class Lowering:
    """The program being built: tensors, constants, weight layers and instructions.

    Every tensor's dim 0 is the batch on the chip. A graph input whose dim 0 is no batch
    (``replicated``) travels with a batch axis put in front of its own dims, each sample a
    copy of the whole input, and so does what only elementwise ops make of it.
    """

    def __init__(self, source: str, consts: dict[str, np.ndarray], shared: str, uses: dict[str, int],
                 batch_size: int | None):
        self.source = source
        self.consts = consts
        self.shared = shared
        self.uses = uses                  # initializer -> number of node inputs naming it
        self.batch_size = batch_size      # the model's fixed batch size, None when symbolic
        self.tensors: list[TensorDecl] = []
        self.ids: dict[str, int] = {}
        self.constants: dict[int, np.ndarray] = {}
        self.instructions: list[Instr] = []
        self.weights: dict[str, np.ndarray] = {}        # layer name -> (in, out) float64 matrix
        self.weight_sources: dict[str, str] = {}        # layer name -> initializer name
        self.families: list[list[str]] = []             # layers quantised with one per-tensor scale
        self.channel_axes: dict[str, int] = {}          # initializer -> its output-channel axis
        self._layer_index: dict[str, int] = {}
        self._probe_weights: list[np.ndarray] = []
        self.node: onnx.NodeProto | None = None
        self.label = ""
        self.graph_outputs: set[str] = set()             # names the model returns
        self.replicated: set[int] = set()                # tensors whose dim 0 was put in front of their own

    # -- helpers for handlers -------------------------------------------------------
    def error(self, message: str) -> CompileError:
        return CompileError(f"{self.source}: node '{self.label}' ({self.node.op_type}): {message}")

    def batch_error(self, message: str) -> BatchMixingError:
        return BatchMixingError(f"{self.source}: node '{self.label}' ({self.node.op_type}): {message}")

    def is_replicated(self, name: str) -> bool:
        return self.ids_for(name) in self.replicated

    def tensor(self, name: str, shape: tuple[int, ...]) -> int:
        self.ids[name] = len(self.tensors)
        self.tensors.append(TensorDecl(name, tuple(int(d) for d in shape)))
        return self.ids[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[self.ids_for(name)].shape

    def ids_for(self, name: str) -> int:
        """Tensor id of ``name``, declaring it as a chip constant if it is an initializer."""
        if name not in self.ids:
            if name not in self.consts:
                raise self.error(f"input '{name}' is neither produced by an earlier node nor a constant")
            self.constant(name, self.consts[name])
        return self.ids[name]

    def constant(self, name: str, value: np.ndarray) -> str:
        tid = self.tensor(name, np.shape(value))
        self.constants[tid] = np.asarray(value, dtype=np.float32)
        return name

    def const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise self.error(f"{what} '{name}' must be a constant (an initializer or computed from them)")
        return self.consts[name]

    def optional_const(self, index: int, what: str) -> np.ndarray | None:
        node = self.node
        if len(node.input) <= index or not node.input[index]:
            return None
        return self.const(node.input[index], what)

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def alias(self, output: str, source: str) -> None:
        """``output`` is ``source`` under another name: no instruction."""
        self.ids[output] = self.ids_for(source)

    def probe(self, tid: int) -> np.ndarray:
        """A batch-of-one stand-in for tensor ``tid``: the constant, or zeros."""
        if tid in self.constants:
            return self.constants[tid]
        return np.zeros((1, *self.tensors[tid].shape[1:]), np.float32)

    def emit(self, op: Opcode, inputs: list[str], outputs: str | list[str], layer: int = -1,
             attrs: dict | None = None) -> None:
        ins = [self.ids_for(n) for n in inputs]
        names = [outputs] if isinstance(outputs, str) else outputs
        instr = Instr(op, self.label, ins, [], layer, attrs or {})
        self._check_size(instr)
        try:
            shapes = output_shapes(instr, [self.probe(t) for t in ins], self._probe_weights.__getitem__)
        except (ValueError, IndexError) as e:
            raise self.error(str(e)) from None
        for name, shape in zip(names, shapes):
            if not shape or shape[0] != 1:
                raise self.batch_error(f"output '{name}' would mix the batch dimension (dim 0) with others "
                                 f"(shape {shape} for a batch of 1); the chip keeps dim 0 as the batch")
            instr.outputs.append(self.tensor(name, (-1, *shape[1:])))
        computed = [t for t in ins if t not in self.constants]
        if computed and all(t in self.replicated for t in computed):
            self.replicated.update(instr.outputs)
        self.instructions.append(instr)

    def _check_size(self, instr: Instr) -> None:
        """Refuse an instruction whose kernel would hold more values per sample than a chip's
        tensor, before its shape rule allocates them."""
        shapes = [(1, *self.tensors[t].shape[1:]) if t not in self.constants else self.constants[t].shape
                  for t in instr.inputs]
        try:
            need = kernel_elements(instr, shapes, lambda i: self._probe_weights[i].shape[1])
        except ValueError as e:
            raise self.error(str(e)) from None
        if need > MAX_SAMPLE_ELEMENTS:
            raise self.error(f"would compute {need} values per sample; a chip's tensor holds at most "
                             f"{MAX_SAMPLE_ELEMENTS}")

    def add_layers(self, source: str, matrices: list[np.ndarray], channel_axis: int) -> int:
        """Register the crossbar layers one node uses (one per conv group); return the first index.

        A weight that several nodes use is one set of layers ("common") or one per node
        ("separate"); a weight used once is named by its initializer in both modes.
        """
        if not all(np.isfinite(w).all() for w in matrices):
            raise self.error(f"weight '{source}' holds non-finite values")
        names = [source] if len(matrices) == 1 else [f"{source}/group{g}" for g in range(len(matrices))]
        if self.shared == "separate" and self.uses.get(source, 0) > 1:
            names = [f"{n}@{self.label}" for n in names]
        for name, w in zip(names, matrices):
            known = self.weights.get(name)
            if known is not None and (known.shape != w.shape or not np.array_equal(known, w)):
                raise self.error(f"weight '{source}' is shared but used here in a different form; "
                                 f"compile with shared='separate'")
        if names[0] not in self.weights:
            for name, w in zip(names, matrices):
                self._layer_index[name] = len(self.weights)
                self.weights[name] = w
                self.weight_sources[name] = source
                self._probe_weights.append(w.astype(np.float32))
            self.families.append(names)
            self.channel_axes[source] = channel_axis
        return self._layer_index[names[0]]

    def bias(self, x: str, b: str, output: str, channel_axis_from_end: int) -> None:
        """out = x + b, a constant bias laid along one axis of x counted from its end."""
        value = np.asarray(self.const(b, "bias"), dtype=np.float32).reshape(-1)
        name = self.constant(f"{output}/bias", value.reshape(-1, *[1] * channel_axis_from_end))
        self.emit(Opcode.ADD, [x, name], output)


def _axis(lo: Lowering, axis: int, rank: int, what: str = "axis") -> int:
    """Normalise an axis and refuse the batch axis."""
    if not -rank <= axis < rank:
        raise lo.error(f"{what}={axis} is outside a rank-{rank} tensor")
    axis %= rank
    if axis == 0:
        raise lo.batch_error(f"{what}=0 would work across the batch dimension; the chip keeps dim 0 as the batch")
    return axis


def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


# -- windows: Conv and pools ----------------------------------------------------------
def _window_pads(lo: Lowering, spatial: tuple[int, ...], kernel: list[int], strides: list[int],
                 dilations: list[int]) -> list[int]:
    """Explicit pads (begins then ends) from the pads attribute or auto_pad."""
    nd = len(kernel)
    auto = lo.attr("auto_pad", "NOTSET")
    if auto == "NOTSET":
        pads = list(lo.attr("pads", [0] * 2 * nd))
        if len(pads) != 2 * nd:
            raise lo.error(f"pads has {len(pads)} values, expected {2 * nd}")
        return pads
    if auto == "VALID":
        return [0] * 2 * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise lo.error(f"auto_pad={auto} is not supported (supported: NOTSET, VALID, SAME_UPPER, SAME_LOWER)")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - small if auto == "SAME_UPPER" else small)
    return begins + ends


def _window_attrs(lo: Lowering, x: str, kernel: list[int]) -> dict:
    shape = lo.shape(x)
    nd = len(kernel)
    if len(shape) != nd + 2:
        raise lo.error(f"input '{x}' has rank {len(shape)}, a {nd}-D kernel needs rank {nd + 2}")
    strides = list(lo.attr("strides", [1] * nd))
    dilations = list(lo.attr("dilations", [1] * nd))
    if len(strides) != nd or len(dilations) != nd or min(strides + dilations, default=1) < 1:
        raise lo.error(f"strides {strides} and dilations {dilations} must be {nd} positive values")
    pads = _window_pads(lo, shape[2:], kernel, strides, dilations)
    if min(pads, default=0) < 0:
        raise lo.error(f"negative pads {pads} are not supported")
    return dict(kernel=list(kernel), strides=strides, pads=pads, dilations=dilations)


def _conv(lo: Lowering, node: onnx.NodeProto) -> None:
    x, w_name = node.input[0], node.input[1]
    w = np.asarray(lo.const(w_name, "weight"), dtype=np.float64)
    if w.ndim < 3:
        raise lo.error(f"weight '{w_name}' has rank {w.ndim}, expected (C_out, C_in/group, *kernel)")
    group = lo.attr("group", 1)
    kernel = list(w.shape[2:])
    if list(lo.attr("kernel_shape", kernel)) != kernel:
        raise lo.error(f"kernel_shape {lo.attr('kernel_shape')} differs from the weight's {kernel}")
    attrs = _window_attrs(lo, x, kernel)
    channels = lo.shape(x)[1]
    c_out, c_in_g = w.shape[:2]
    if channels != c_in_g * group or c_out % group:
        raise lo.error(f"{channels} input channels and weight {w.shape} do not fit group={group}")
    cog = c_out // group
    matrices = [w[g * cog:(g + 1) * cog].reshape(cog, -1).T for g in range(group)]
    first = lo.add_layers(w_name, matrices, channel_axis=0)
    out = node.output[0]
    has_bias = len(node.input) > 2 and node.input[2]
    lo.emit(Opcode.CONV, [x], out + "/conv" if has_bias else out, layer=first, attrs=dict(attrs, group=[group]))
    if has_bias:
        lo.bias(out + "/conv", node.input[2], out, len(kernel))


def _pool(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    average = node.op_type == "AveragePool"
    if not average and len(node.output) > 1 and node.output[1]:
        raise lo.error("the Indices output is not supported (only the pooled values)")
    kernel = lo.attr("kernel_shape")
    if not kernel:
        raise lo.error("kernel_shape is required")
    attrs = _window_attrs(lo, x, list(kernel))
    nd = len(kernel)
    extra = [0] * nd
    if lo.attr("ceil_mode", 0):
        # output size rounded up, but no window may start in the end padding (as onnxruntime)
        spatial = lo.shape(x)[2:]
        for i in range(nd):
            span = (kernel[i] - 1) * attrs["dilations"][i] + 1
            stride = attrs["strides"][i]
            padded = spatial[i] + attrs["pads"][i] + attrs["pads"][nd + i]
            out = -(-(padded - span) // stride) + 1
            if (out - 1) * stride >= spatial[i] + attrs["pads"][i]:
                out -= 1
            extra[i] = max((out - 1) * stride + span - padded, 0)
        attrs["pads"] = attrs["pads"][:nd] + [p + e for p, e in zip(attrs["pads"][nd:], extra)]
    if average:
        attrs.update(ceil_pads=extra, count_include_pad=[int(lo.attr("count_include_pad", 0))])
    lo.emit(Opcode.AVGPOOL if average else Opcode.MAXPOOL, [x], node.output[0], attrs=attrs)


def _conv_transpose(lo: Lowering, node: onnx.NodeProto) -> None:
    """A transposed convolution as zero insertion and a CONV with the flipped, transposed kernel.

    ``y = ConvTranspose(x, W)`` equals ``Conv(z, W')`` where z is x with ``stride - 1`` zeros
    between neighbouring samples, padded by ``(k - 1) * dilation - pad`` per side, and
    ``W'[o, i] = W[i, o]`` flipped along every spatial axis, stride 1. Lowered that way it is
    an ordinary CONV (im2col, one crossbar layer per group, same cells, converters and
    noise as any convolution) behind RESHAPE / PAD / SLICE, rather than a new crossbar
    op with a col2im scatter: the price is the zero rows a strided one drives.
    """
    x, w_name = node.input[0], node.input[1]
    w = np.asarray(lo.const(w_name, "weight"), dtype=np.float64)
    if w.ndim < 3:
        raise lo.error(f"weight '{w_name}' has rank {w.ndim}, expected (C_in, C_out/group, *kernel)")
    shape = lo.shape(x)
    kernel = list(w.shape[2:])
    nd = len(kernel)
    if list(lo.attr("kernel_shape", kernel)) != kernel:
        raise lo.error(f"kernel_shape {lo.attr('kernel_shape')} differs from the weight's {kernel}")
    if len(shape) != nd + 2:
        raise lo.error(f"input '{x}' has rank {len(shape)}, a {nd}-D kernel needs rank {nd + 2}")
    group = lo.attr("group", 1)
    c_in, cog = w.shape[:2]
    if shape[1] != c_in or c_in % group:
        raise lo.error(f"{shape[1]} input channels and weight {w.shape} do not fit group={group}")
    strides = list(lo.attr("strides", [1] * nd))
    dilations = list(lo.attr("dilations", [1] * nd))
    extra = list(lo.attr("output_padding", [0] * nd))
    if len(strides) != nd or len(dilations) != nd or len(extra) != nd or min(strides + dilations, default=1) < 1 \
            or min(extra, default=0) < 0:
        raise lo.error(f"strides {strides}, dilations {dilations} and output_padding {extra} must be {nd} values "
                       f"(positive, positive, >= 0)")
    spatial = shape[2:]
    full = [(n - 1) * s + (k - 1) * d + 1 for n, s, k, d in zip(spatial, strides, kernel, dilations)]
    auto = lo.attr("auto_pad", "NOTSET")
    wanted = lo.attr("output_shape")
    if wanted is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = list(wanted)[-nd:] if wanted is not None else [n * s for n, s in zip(spatial, strides)]
        if len(wanted) != nd or min(wanted) < 1:
            raise lo.error(f"output_shape {wanted} must be {nd} positive sizes")
        totals = [f + e - o for f, e, o in zip(full, extra, wanted)]  # negative: the output grows at the end
        if any(-t >= s for t, s in zip(totals, strides)):
            raise lo.error(f"output_shape {wanted} is more than a stride beyond the full output {full}")
        # as onnxruntime: SAME_UPPER puts the odd pad last, otherwise first
        heads = [max(t // 2 if auto == "SAME_UPPER" else t - t // 2, 0) for t in totals]
        pads = heads + [t - h for t, h in zip(totals, heads)]
    elif auto == "VALID":
        pads = [0] * 2 * nd
    elif auto == "NOTSET":
        pads = list(lo.attr("pads", [0] * 2 * nd))
        if len(pads) != 2 * nd or min(pads) < 0:
            raise lo.error(f"pads {pads} must be {2 * nd} values >= 0")
    else:
        raise lo.error(f"auto_pad={auto} is not supported (supported: NOTSET, VALID, SAME_UPPER, SAME_LOWER)")
    out = node.output[0]
    z = x
    if any(s > 1 for s in strides):  # zeros between samples: (..., S, 1) padded to (..., S, s), merged
        split = [-1, shape[1]] + [d for n, s in zip(spatial, strides) for d in (n, 1)]
        lo.emit(Opcode.RESHAPE, [x], f"{out}/split", attrs={"shape": split})
        grow = [0] * 2 * len(split)
        for i, s in enumerate(strides):
            grow[len(split) + 3 + 2 * i] = s - 1
        lo.emit(Opcode.PAD, [f"{out}/split"], f"{out}/spread", attrs={"pads": grow, "mode": [0], "value": [0.0]})
        z = f"{out}/zeros"
        _reshape_to(lo, f"{out}/spread", [-1, shape[1], *[n * s for n, s in zip(spatial, strides)]], z)
    # conv pads around z; the s - 1 zeros after the last sample are not part of it
    begins = [(k - 1) * d - p for k, d, p in zip(kernel, dilations, pads[:nd])]
    ends = [(k - 1) * d - p + e - (s - 1) for k, d, p, e, s in zip(kernel, dilations, pads[nd:], extra, strides)]
    if min(begins + ends) < 0:  # pads larger than the kernel's reach: crop instead
        size = lo.shape(z)[2:]
        crop = {"starts": [0] + [max(-b, 0) for b in begins],
                "counts": [shape[1]] + [n - max(-b, 0) - max(-e, 0) for n, b, e in zip(size, begins, ends)],
                "steps": [1] * (nd + 1)}
        lo.emit(Opcode.SLICE, [z], f"{out}/cropped", attrs=crop)
        z = f"{out}/cropped"
    flipped = np.flip(w, axis=tuple(range(2, w.ndim)))
    cig = c_in // group
    matrices = [flipped[g * cig:(g + 1) * cig].transpose(1, 0, *range(2, w.ndim)).reshape(cog, -1).T
                for g in range(group)]
    first = lo.add_layers(w_name, matrices, channel_axis=1)
    attrs = dict(kernel=kernel, strides=[1] * nd, pads=[max(b, 0) for b in begins] + [max(e, 0) for e in ends],
                 dilations=dilations, group=[group])
    has_bias = len(node.input) > 2 and node.input[2]
    lo.emit(Opcode.CONV, [z], out + "/conv" if has_bias else out, layer=first, attrs=attrs)
    if has_bias:
        lo.bias(out + "/conv", node.input[2], out, nd)


def _global_pool(lo: Lowering, node: onnx.NodeProto) -> None:
    if len(lo.shape(node.input[0])) < 3:
        raise lo.error("input needs spatial dimensions (N, C, ...)")
    lo.emit(_ONE_TO_ONE[node.op_type], [node.input[0]], node.output[0])


# -- matrix products ------------------------------------------------------------------
def _gemm(lo: Lowering, node: onnx.NodeProto) -> None:
    if lo.attr("transA", 0):
        raise lo.error("transA=1 is not supported (the activation must be the left operand as is)")
    a, b = node.input[0], node.input[1]
    if len(lo.shape(a)) != 2:
        raise lo.error(f"input '{a}' has rank {len(lo.shape(a))}, Gemm takes rank 2")
    w = np.asarray(lo.const(b, "weight"), dtype=np.float64)
    if w.ndim != 2:
        raise lo.error(f"weight '{b}' has rank {w.ndim}, expected 2")
    trans = lo.attr("transB", 0)
    w = (w.T if trans else w) * lo.attr("alpha", 1.0)
    out = node.output[0]
    has_bias = len(node.input) > 2 and node.input[2]
    layer = lo.add_layers(b, [w], channel_axis=0 if trans else 1)
    lo.emit(Opcode.MATMUL, [a], out + "/matmul" if has_bias else out, layer=layer)
    if has_bias:
        c = node.input[2]
        beta = lo.attr("beta", 1.0)
        if c in lo.consts:
            value = np.asarray(lo.consts[c], dtype=np.float32) * np.float32(beta)
            c = lo.constant(f"{out}/bias", value)
        elif beta != 1.0:
            raise lo.error(f"beta={beta} with a bias computed on the chip is not supported (only beta=1)")
        lo.emit(Opcode.ADD, [out + "/matmul", c], out)


def _matmul(lo: Lowering, node: onnx.NodeProto) -> None:
    x, w_name = node.input
    if w_name not in lo.consts:
        what = "a constant left operand" if x in lo.consts else "two computed operands"
        raise lo.error(f"{what} is not supported; the right operand must be a constant weight for the crossbars")
    w = np.asarray(lo.consts[w_name], dtype=np.float64)
    if w.ndim != 2:
        raise lo.error(f"weight '{w_name}' has rank {w.ndim}, expected 2")
    layer = lo.add_layers(w_name, [w], channel_axis=1)
    lo.emit(Opcode.MATMUL, [x], node.output[0], layer=layer)


def _batchnorm(lo: Lowering, node: onnx.NodeProto) -> None:
    """A BatchNormalization the front end could not fold: per-channel scale and shift."""
    if lo.attr("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise lo.error("training mode (batch statistics) is not supported; export the model in eval mode")
    x = node.input[0]
    rank = len(lo.shape(x))
    if rank < 2:
        raise lo.error(f"input '{x}' has rank {rank}, BatchNormalization needs (N, C, ...)")
    gamma, beta, mean, var = (np.asarray(lo.const(n, "statistic"), dtype=np.float64) for n in node.input[1:5])
    s = gamma / np.sqrt(var + lo.attr("epsilon", 1e-5))
    ones = [1] * (rank - 2)
    out = node.output[0]
    scale = lo.constant(f"{out}/scale", s.reshape(-1, *ones))
    shift = lo.constant(f"{out}/shift", (beta - mean * s).reshape(-1, *ones))
    lo.emit(Opcode.MUL, [x, scale], out + "/scaled")
    lo.emit(Opcode.ADD, [out + "/scaled", shift], out)


def _gather(lo: Lowering, node: onnx.NodeProto) -> None:
    """Rows of a constant table picked by integer indices (an embedding): ONE_HOT, then MATMUL.

    The table is a crossbar layer (rows x the rest of its shape): each index drives one
    row, so the table sits in the non-volatile cells like every other weight (quantised,
    noisy, write-verified and TSB-trainable alike) instead of in digital memory, which an
    embedding table, often a model's largest weight, would not fit.
    """
    table_name, indices = node.input
    if table_name not in lo.consts:
        raise lo.error(f"data '{table_name}' is computed on the chip; only a Gather from a constant table "
                       f"(an embedding) is supported")
    table = np.asarray(lo.consts[table_name], dtype=np.float64)
    if table.ndim < 1 or lo.attr("axis", 0) % max(table.ndim, 1) != 0:
        raise lo.error(f"axis={lo.attr('axis', 0)}: only rows (axis 0) of the table can be gathered")
    if indices in lo.consts:
        raise lo.error(f"indices '{indices}' are constant and the table too; nothing to compute on the chip")
    rows = table.shape[0]
    if rows >= 1 << 24:
        raise lo.error(f"table '{table_name}' has {rows} rows; indices travel as float32, exact below 2^24")
    out = node.output[0]
    matrix = table.reshape(rows, -1)
    layer = lo.add_layers(table_name, [matrix], channel_axis=1)
    lo.emit(Opcode.ONE_HOT, [indices], f"{out}/one_hot", attrs={"depth": [rows]})
    if table.ndim == 2:
        lo.emit(Opcode.MATMUL, [f"{out}/one_hot"], out, layer=layer)
        return
    lo.emit(Opcode.MATMUL, [f"{out}/one_hot"], f"{out}/rows", layer=layer)
    _reshape_to(lo, f"{out}/rows", [*lo.shape(indices), *table.shape[1:]], out)


def _lrn(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    if len(lo.shape(x)) < 3:
        raise lo.error(f"input '{x}' has rank {len(lo.shape(x))}; LRN needs (N, C, D1, ...)")
    size = lo.attr("size")
    if size is None or size < 1:
        raise lo.error(f"size={size}: a positive number of channels is required")
    attrs = {a.name: [float(lo.attr(a.name, a.onnx_default))] for a in OPS[Opcode.LRN].attrs if a.name != "size"}
    lo.emit(Opcode.LRN, [x], node.output[0], attrs=dict(attrs, size=[int(size)]))


# -- elementwise ----------------------------------------------------------------------
# ONNX operators that become one instruction of the opcode the op table names for them
_BINARY = by_onnx("Add", "Sub", "Mul", "Div", "PRelu")
_UNARY = by_onnx("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "Exp", "Neg", "Abs")
_REDUCE = by_onnx("ReduceMean", "ReduceSum", "ReduceMax")
_ONE_TO_ONE = by_onnx("GlobalAveragePool", "GlobalMaxPool", "Softmax", "LogSoftmax")


def _aligned(lo: Lowering, names: list[str]) -> list[str]:
    """Operands of a broadcasting op, a replicated one reshaped so that its own dims line up
    with the others' as ONNX aligns them (from the right), its batch axis with theirs."""
    if not any(n not in lo.consts and lo.is_replicated(n) for n in names):
        return names
    ranks = [len(np.shape(lo.consts[n])) if n in lo.consts else len(lo.shape(n)) - lo.is_replicated(n)
             for n in names]
    batched = any(n not in lo.consts and not lo.is_replicated(n) for n in names)
    after_batch = max(ranks) - 1 if batched else max(ranks)  # the result's dims after its batch axis
    out = []
    for name, rank in zip(names, ranks):
        if name in lo.consts or not lo.is_replicated(name) or rank == after_batch:
            out.append(name)
            continue
        dims = list(lo.shape(name)[1:])
        if rank > after_batch and dims[0] != 1:
            raise lo.batch_error(f"input '{name}' (no batch dimension, shape {tuple(dims)}) would meet the batch "
                                 f"dimension of the other operands with size {dims[0]}")
        shape = [-1, *dims[1:]] if rank > after_batch else [-1, *[1] * (after_batch - rank), *dims]
        aligned = f"{name}/aligned@{lo.label}"
        if aligned not in lo.ids:
            _reshape_to(lo, name, shape, aligned)
        out.append(aligned)
    return out


def _binary(lo: Lowering, node: onnx.NodeProto) -> None:
    lo.emit(_BINARY[node.op_type], _aligned(lo, list(node.input[:2])), node.output[0])


def _sum(lo: Lowering, node: onnx.NodeProto) -> None:
    acc = node.input[0]
    if len(node.input) == 1:
        lo.alias(node.output[0], acc)
        return
    terms = _aligned(lo, list(node.input))
    acc = terms[0]
    for i, term in enumerate(terms[1:], start=1):
        out = node.output[0] if i == len(node.input) - 1 else f"{node.output[0]}/sum{i}"
        lo.emit(Opcode.ADD, [acc, term], out)
        acc = out


def _unary(lo: Lowering, node: onnx.NodeProto) -> None:
    """One-input elementwise ops; their attributes (all floats) default as ONNX's do."""
    op = _UNARY[node.op_type]
    attrs = {a.name: [float(lo.attr(a.name, a.onnx_default))] for a in OPS[op].attrs}
    lo.emit(op, [node.input[0]], node.output[0], attrs=attrs)


def _clip(lo: Lowering, node: onnx.NodeProto) -> None:
    low, high = lo.optional_const(1, "min"), lo.optional_const(2, "max")
    attrs = {"min": [float(-np.inf if low is None else low)], "max": [float(np.inf if high is None else high)]}
    lo.emit(Opcode.CLIP, [node.input[0]], node.output[0], attrs=attrs)


def _softmax(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    axis = _axis(lo, lo.attr("axis", -1), len(lo.shape(x)))
    lo.emit(_ONE_TO_ONE[node.op_type], [x], node.output[0], attrs={"axis": [axis]})


def _reduce(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank = len(lo.shape(x))
    axes = _axes_input(lo, node)
    if not axes:
        if lo.attr("noop_with_empty_axes", 0):
            lo.alias(node.output[0], x)
            return
        raise lo.batch_error("reducing over every axis would include the batch dimension; give axes")
    axes = sorted({_axis(lo, a, rank, "axes") for a in axes})
    lo.emit(_REDUCE[node.op_type], [x], node.output[0],
            attrs={"axes": axes, "keepdims": [int(lo.attr("keepdims", 1))]})


def _identity(lo: Lowering, node: onnx.NodeProto) -> None:
    if node.op_type == "Dropout":
        training = lo.optional_const(2, "training_mode")
        if training is not None and bool(training):
            raise lo.error("training_mode=true is not supported (inference only)")
        mask = node.output[1] if len(node.output) > 1 else ""
        if mask and (lo.uses.get(mask) or mask in lo.graph_outputs):
            # in inference the mask is all ones; an unused one is simply not computed
            raise lo.error(f"the mask output '{mask}' is used; the chip computes no mask "
                           f"(in inference it is all ones: drop it from the model)")
    if node.op_type == "Cast" and lo.attr("to") != TensorProto.FLOAT:
        raise lo.error(f"cast to {TensorProto.DataType.Name(lo.attr('to'))} is not supported "
                       f"(the chip computes in float32; only casts to FLOAT)")
    lo.alias(node.output[0], node.input[0])


# -- data movement --------------------------------------------------------------------
def _reshape_to(lo: Lowering, x: str, shape: list[int], out: str) -> None:
    lo.emit(Opcode.RESHAPE, [x], out, attrs={"shape": [-1, *shape[1:]]})


def _reshape(lo: Lowering, node: onnx.NodeProto) -> None:
    """The target keeps the batch first: 0 (copy), -1 (inferred as the batch), or the model's fixed batch."""
    x = node.input[0]
    target = _ints(lo.const(node.input[1], "shape"))
    src = lo.shape(x)
    allowzero = lo.attr("allowzero", 0)
    rest_in = math.prod(src[1:])
    dims = [src[i] if (t == 0 and not allowzero and i < len(src)) else t for i, t in enumerate(target)]
    if not dims:
        raise lo.batch_error("a reshape to a scalar would drop the batch dimension")
    head, tail = dims[0], dims[1:]
    known = math.prod(d for d in tail if d != -1)
    fits = head == -1 or head == lo.batch_size
    if tail.count(-1) == 1 and known and rest_in % known == 0:
        tail[tail.index(-1)] = rest_in // known
    if not fits or -1 in tail or math.prod(tail) != rest_in:
        raise lo.batch_error(f"reshape of {_show(src)} to {target} would mix the batch dimension with others; "
                       f"the first entry must keep the batch (0, -1 or the batch size) and the rest "
                       f"must hold the {rest_in} values of one sample")
    _reshape_to(lo, x, [-1, *tail], node.output[0])


def _show(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"


def _flatten(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = lo.shape(x)
    axis = lo.attr("axis", 1)
    if (axis + len(shape) if axis < 0 else axis) != 1:
        raise lo.batch_error(f"axis={axis} would mix the batch dimension into the features; only axis=1 is supported")
    _reshape_to(lo, x, [-1, math.prod(shape[1:])], node.output[0])


def _axes_input(lo: Lowering, node: onnx.NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        return _ints(lo.const(node.input[1], "axes"))
    axes = lo.attr("axes")
    return None if axes is None else list(axes)


def _squeeze(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = list(lo.shape(x))
    axes = _axes_input(lo, node)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1 and i > 0]
    axes = {_axis(lo, a, len(shape), "axes") for a in axes}
    for a in axes:
        if shape[a] != 1:
            raise lo.error(f"cannot squeeze axis {a} of size {shape[a]}")
    _reshape_to(lo, x, [d for i, d in enumerate(shape) if i not in axes], node.output[0])


def _unsqueeze(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = list(lo.shape(x))
    axes = _axes_input(lo, node) or []
    rank = len(shape) + len(axes)
    for a in sorted(_axis(lo, a, rank, "axes") for a in axes):
        shape.insert(a, 1)
    _reshape_to(lo, x, shape, node.output[0])


def _transpose(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank = len(lo.shape(x))
    perm = list(lo.attr("perm", range(rank - 1, -1, -1)))
    if sorted(perm) != list(range(rank)):
        raise lo.error(f"perm {perm} is not a permutation of {rank} axes")
    if perm[0] != 0:
        raise lo.batch_error(f"perm {perm} moves the batch dimension; the chip keeps dim 0 as the batch")
    lo.emit(Opcode.TRANSPOSE, [x], node.output[0], attrs={"perm": perm})


def _concat(lo: Lowering, node: onnx.NodeProto) -> None:
    rank = len(lo.shape(node.input[0]))
    axis = _axis(lo, lo.attr("axis"), rank)
    lo.emit(Opcode.CONCAT, list(node.input), node.output[0], attrs={"axis": [axis]})


def _slice(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = lo.shape(x)
    starts = _ints(lo.const(node.input[1], "starts"))
    ends = _ints(lo.const(node.input[2], "ends"))
    axes = lo.optional_const(3, "axes")
    steps = lo.optional_const(4, "steps")
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    # one (start, count, step) per non-batch axis; untouched axes keep everything
    plan = {a: (0, d, 1) for a, d in enumerate(shape) if a > 0}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise lo.error("a step of 0 is not valid")
        if axis % len(shape) == 0:
            if start == 0 and end >= 2 ** 31 - 1 and step == 1:
                continue  # the whole batch
            raise lo.batch_error("slicing the batch dimension is not supported; the chip keeps dim 0 as the batch")
        axis = _axis(lo, axis, len(shape))
        first, stop, step = slice(start, end, step).indices(shape[axis])
        plan[axis] = (first, len(range(first, stop, step)), step)
    attrs = {"starts": [plan[a][0] for a in sorted(plan)], "counts": [plan[a][1] for a in sorted(plan)],
             "steps": [plan[a][2] for a in sorted(plan)]}
    lo.emit(Opcode.SLICE, [x], node.output[0], attrs=attrs)


_PAD_MODES = {name: code for code, name in PAD_MODES.items()}  # ONNX mode -> PAD's mode attribute


def _pad(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    rank = len(lo.shape(x))
    mode = lo.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise lo.error(f"mode={mode} is not supported (supported: {', '.join(_PAD_MODES)})")
    given = _ints(lo.const(node.input[1], "pads"))
    value = lo.optional_const(2, "constant_value")
    axes = lo.optional_const(3, "axes")
    axes = list(range(rank)) if axes is None else [a % rank for a in _ints(axes)]
    if len(given) != 2 * len(axes):
        raise lo.error(f"pads has {len(given)} values for {len(axes)} axes")
    pads = [0] * 2 * rank
    for i, a in enumerate(axes):
        pads[a], pads[rank + a] = given[i], given[len(axes) + i]
    if pads[0] or pads[rank]:
        raise lo.batch_error("padding the batch dimension is not supported; the chip keeps dim 0 as the batch")
    attrs = {"pads": pads, "mode": [_PAD_MODES[mode]], "value": [float(0.0 if value is None else value)]}
    lo.emit(Opcode.PAD, [x], node.output[0], attrs=attrs)


def _split(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = lo.shape(x)
    axis = _axis(lo, lo.attr("axis", 0), len(shape))
    outputs = list(node.output)
    sizes = lo.optional_const(1, "split")
    if sizes is None:
        sizes = lo.attr("split")
    if sizes is None:
        parts = lo.attr("num_outputs", len(outputs))
        each = -(-shape[axis] // parts)
        sizes = [min(each, shape[axis] - i * each) for i in range(parts)]
    sizes = _ints(sizes)
    if sum(sizes) != shape[axis] or len(sizes) != len(outputs) or min(sizes) < 0:
        raise lo.error(f"split sizes {sizes} do not cut axis {axis} of size {shape[axis]} into {len(outputs)}")
    names = [o or f"{node.output[0]}/unused{i}" for i, o in enumerate(outputs)]
    lo.emit(Opcode.SPLIT, [x], names, attrs={"axis": [axis], "sizes": sizes})


def check_replicated(lo: Lowering, node: onnx.NodeProto) -> None:
    """Only elementwise ops take an input whose dim 0 is no batch (right-aligned broadcasting
    keeps the batch axis put in front of it out of their way); refuse the rest by name."""
    if node.op_type in ELEMENTWISE:
        return
    for name in node.input:
        if name and name not in lo.consts and lo.is_replicated(name):
            raise lo.batch_error(f"input '{name}' has no batch dimension (its dim 0 is data); only elementwise "
                                 f"ops ({', '.join(sorted(ELEMENTWISE))}) take such a tensor: give the model's "
                                 f"batch dimension a symbolic name (e.g. 'N') where it has one")


HANDLERS: dict[str, Callable[[Lowering, onnx.NodeProto], None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gather": _gather,
    "LRN": _lrn,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batchnorm,
    **{op: _binary for op in _BINARY},
    "Sum": _sum,
    **{op: _unary for op in _UNARY},
    "Clip": _clip,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    **{op: _reduce for op in _REDUCE},
    "Identity": _identity,
    "Dropout": _identity,
    "Cast": _identity,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Concat": _concat,
    "Slice": _slice,
    "Pad": _pad,
    "Split": _split,
}

# ops that take a tensor whose dim 0 is no batch (see check_replicated)
ELEMENTWISE = frozenset({*_BINARY, *_UNARY, "Sum", "Clip", "Identity", "Dropout", "Cast"})
