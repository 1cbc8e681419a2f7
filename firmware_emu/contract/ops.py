"""The op table: what every opcode of the program format means, declared once.

One row (``OpSpec``) per ``Opcode``: its unit, inputs, attributes (name, type, meaning),
the ONNX operators the compiler lowers to it, its shape rule, its reference kernel (the
numpy semantics every implementation must match) and its form as an ONNX node (how a
program is handed to onnxruntime whole). The compiler learns output shapes from it, the
emulator's interpreter and graph engine run it, and docs/program-format.md is rendered
from it, so none of them can disagree about what an opcode does.

Kernels are vectorised over the whole batch and take (instruction, input arrays, weight
provider); the crossbar kernels multiply by a layer's effective weight matrix (see
``program_format.effective_weights``), which is exact for ideal converters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .program_format import Instr, Opcode

if TYPE_CHECKING:
    from .program_graph import GraphBuilder

WeightProvider = Callable[[int], np.ndarray]  # layer index -> (in_features, out_features) float32
Kernel = Callable[[Instr, list[np.ndarray], WeightProvider], list[np.ndarray]]
ShapeRule = Callable[[Instr, list[np.ndarray], WeightProvider], list[tuple[int, ...]]]
GraphForm = Callable[["GraphBuilder", Instr, list[str], list[str]], None]


class ExecutionError(ValueError):
    """The program cannot run on the given inputs; names the instruction."""


class NoGraphForm(ValueError):
    """An instruction uses a form one ONNX graph cannot express exactly (an interpreter runs it)."""


@dataclass(frozen=True)
class Attr:
    """One named attribute of an instruction (stored as a list of ints or of floats)."""

    name: str
    type: str            # "int", "float" (one value) or "ints" (a list)
    meaning: str
    onnx_default: float | None = None  # ONNX's default, used when the node omits it


@dataclass(frozen=True)
class OpSpec:
    """One opcode: its documentation, its semantics and its ONNX form."""

    opcode: Opcode
    unit: str                 # "crossbar" (reads layer ``layer``) or "digital"
    inputs: str               # what the inputs are, for people
    attrs: tuple[Attr, ...]
    onnx: tuple[str, ...]     # ONNX operators the compiler lowers to this opcode
    shape: str                # output shape(s) from input shapes and attributes
    computes: str             # the semantics in words; ``kernel`` is the definition
    kernel: Kernel
    graph: GraphForm          # adds the ONNX node(s) computing it to a graph
    view: bool = False        # the kernel's outputs may be views of its input
    shape_rule: ShapeRule | None = None  # output shapes without running the kernel, where that is costly

    @property
    def name(self) -> str:
        return self.opcode.name


# -- kernel helpers -------------------------------------------------------------------
def _f(ins: Instr, name: str) -> np.float32:
    return np.float32(ins.attrs[name][0])


def pad_spatial(x: np.ndarray, pads: list[int], nd: int, value: float) -> np.ndarray:
    """x (N, C, *S) padded on its nd spatial axes; pads lists all begins then all ends."""
    if not any(pads):
        return x
    if min(pads) < 0:
        raise ValueError(f"negative pads {list(pads)}")
    # one pass: a fresh zero array needs no writing, then the interior copied (np.pad's strided border fill
    # took as long as the copy)
    shape = x.shape[:2] + tuple(n + a + b for n, a, b in zip(x.shape[2:], pads[:nd], pads[nd:]))
    out = np.zeros(shape, x.dtype) if value == 0 else np.full(shape, value, x.dtype)
    out[(slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(pads[:nd], x.shape[2:]))] = x
    return out


def windows(ins: Instr, x: np.ndarray) -> np.ndarray:
    """A CONV's input windows as a view, nothing copied: (N, *O, C, *K), output position
    first, then the window's (channel, kernel offset) rows."""
    a = ins.attrs
    kernel, pads = a["kernel"], a["pads"]
    nd = len(kernel)
    padded = pad_spatial(x, pads, nd, 0.0)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, a["dilations"])]
    v = sliding_window_view(padded, span, axis=tuple(range(2, 2 + nd)))
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in a["strides"])
          + tuple(slice(None, None, d) for d in a["dilations"])]               # (N, C, *O, *K)
    return v.transpose(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))


def im2col(ins: Instr, x: np.ndarray, rows: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The windows of a CONV's input as crossbar rows: (N * positions, group * rows), each
    group's rows in (channel, kernel offset) order, and the output's spatial shape."""
    v = windows(ins, x)
    nd = len(ins.attrs["kernel"])
    return v.reshape(-1, ins.attrs["group"][0] * rows), v.shape[1:1 + nd]


def conv_layers(ins: Instr, x: np.ndarray, weights: WeightProvider) -> list[np.ndarray]:
    """The ``group`` weight matrices a CONV multiplies by, checked against its input."""
    kernel, group = ins.attrs["kernel"], ins.attrs["group"][0]
    nd = len(kernel)
    matrices = [weights(ins.layer + g) for g in range(group)]              # each (Cg*K, Cog)
    rows, cols = matrices[0].shape
    channels = x.shape[1]
    if channels % group or rows != channels // group * int(np.prod(kernel)) \
            or any(m.shape != (rows, cols) for m in matrices):
        raise ExecutionError(f"input has {channels} channels; {group} layer(s) of {rows} rows expect "
                             f"{rows * group // int(np.prod(kernel))}")
    if nd > 3:
        raise ExecutionError(f"{nd}-D convolution: the chip's windows are 1-D to 3-D")
    return matrices


def matmul_layer(ins: Instr, x: np.ndarray, weights: WeightProvider) -> np.ndarray:
    """The weight matrix a MATMUL multiplies by, checked against its input."""
    w = weights(ins.layer)
    if x.shape[-1] != w.shape[0]:
        raise ExecutionError(f"input has {x.shape[-1]} features, layer expects {w.shape[0]}")
    return w


def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    x, = args
    return [x @ matmul_layer(ins, x, weights)]


def window_positions(ins: Instr, spatial: tuple[int, ...]) -> list[int]:
    """Output size per spatial axis of a windowed op (CONV, pools) on an input of ``spatial``."""
    a = ins.attrs
    pads, nd = a["pads"], len(a["kernel"])
    return [(n + pads[i] + pads[nd + i] - (k - 1) * d - 1) // s + 1
            for i, (n, k, s, d) in enumerate(zip(spatial, a["kernel"], a["strides"], a["dilations"]))]


def _conv_shape(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> list[tuple[int, ...]]:
    x, = args
    matrices = conv_layers(ins, x, weights)
    out = window_positions(ins, x.shape[2:])
    if min(out, default=1) < 1:
        raise ExecutionError(f"the {ins.attrs['kernel']} window (dilations {ins.attrs['dilations']}) does not fit "
                             f"the padded input {tuple(x.shape[2:])}")
    return [(x.shape[0], len(matrices) * matrices[0].shape[1], *out)]


def _conv(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """out[n, o, p] = sum_r im2col(x)[n, p, r] * W[r, o], one matrix W per group."""
    x, = args
    matrices = conv_layers(ins, x, weights)
    rows = matrices[0].shape[0]
    cols, spatial = im2col(ins, x, rows)
    out = np.concatenate([cols[:, g * rows:(g + 1) * rows] @ m for g, m in enumerate(matrices)], axis=1)
    return [np.moveaxis(out.reshape(x.shape[0], *spatial, -1), -1, 1)]


def window_reduce(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
                  reduce: np.ufunc) -> np.ndarray:
    """Reduce every window of an (already padded) x (N, C, *S) with ``reduce`` (maximum, add).

    One vectorised pass per kernel offset (prod(kernel) passes), never one per pixel.
    """
    spatial = x.shape[2:]
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(spatial, kernel, strides, dilations)]
    acc = None
    for offset in np.ndindex(*kernel):
        view = x[(slice(None), slice(None)) + tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offset, dilations, strides, out))]
        if acc is None:
            acc = np.array(view, dtype=np.float32)
        else:
            reduce(acc, view, out=acc)
    return acc


def _pool(ins: Instr, x: np.ndarray, average: bool) -> np.ndarray:
    a = ins.attrs
    kernel, strides, dilations, pads = a["kernel"], a["strides"], a["dilations"], a["pads"]
    nd = len(kernel)
    if not average:
        return window_reduce(pad_spatial(x, pads, nd, -np.inf), kernel, strides, dilations, np.maximum)
    total = window_reduce(pad_spatial(x, pads, nd, 0.0), kernel, strides, dilations, np.add)
    # divisor: the input cells of each window, plus its explicit pads if count_include_pad;
    # the extra end padding ceil_mode adds never counts
    extra = a["ceil_pads"]
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    if a["count_include_pad"][0]:
        explicit = [p - e for p, e in zip(pads[nd:], extra)]
        ones = pad_spatial(ones, pads[:nd] + explicit, nd, 1.0)
        ones = pad_spatial(ones, [0] * nd + list(extra), nd, 0.0)
    else:
        ones = pad_spatial(ones, pads, nd, 0.0)
    total /= window_reduce(ones, kernel, strides, dilations, np.add)
    return total


def _softmax(x: np.ndarray, axis: int, log: bool) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=axis, keepdims=True)
    return shifted - np.log(s) if log else e / s


PAD_MODES = {0: "constant", 1: "reflect", 2: "edge", 3: "wrap"}  # PAD's mode attribute -> numpy / ONNX name


def _pad(ins: Instr, x: np.ndarray) -> np.ndarray:
    a = ins.attrs
    pads = a["pads"]
    nd = x.ndim
    crop = tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(pads[:nd], pads[nd:])))
    x = x[crop]  # negative pads remove elements
    width = [(max(b, 0), max(e, 0)) for b, e in zip(pads[:nd], pads[nd:])]
    mode = PAD_MODES[a["mode"][0]]
    if mode == "constant":
        return np.pad(x, width, constant_values=np.float32(a["value"][0]))
    return np.pad(x, width, mode=mode)


def _slice(ins: Instr, x: np.ndarray) -> np.ndarray:
    a = ins.attrs
    index = [slice(None)]  # the batch, then one (start, count, step) per axis after it
    for start, count, step in zip(a["starts"], a["counts"], a["steps"]):
        stop = start + count * step
        index.append(slice(start, stop if stop >= 0 else None, step))
    return x[tuple(index)]


def _reduce_args(ins: Instr) -> dict:
    return {"axis": tuple(ins.attrs["axes"]), "keepdims": bool(ins.attrs["keepdims"][0])}


def _selu(ins: Instr, x: np.ndarray) -> np.ndarray:
    alpha, gamma = _f(ins, "alpha"), _f(ins, "gamma")
    return gamma * np.where(x > 0, x, alpha * np.expm1(x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| only: no overflow for large negative inputs
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _lrn(ins: Instr, x: np.ndarray) -> np.ndarray:
    """x / (bias + alpha / size * sum of x^2 over the ``size`` channels around each one)^beta;
    the window reaches floor((size-1)/2) channels down and ceil((size-1)/2) up, zeros past the ends."""
    size = ins.attrs["size"][0]
    below, above = (size - 1) // 2, size // 2
    square = np.square(x, dtype=np.float32)
    padded = np.pad(square, [(0, 0), (below, above)] + [(0, 0)] * (x.ndim - 2))
    total = sliding_window_view(padded, size, axis=1).sum(axis=-1, dtype=np.float32)
    return x / (_f(ins, "bias") + _f(ins, "alpha") / np.float32(size) * total) ** _f(ins, "beta")


def _one_hot(ins: Instr, x: np.ndarray) -> np.ndarray:
    """1 at each index's position along a new last axis of ``depth``, 0 elsewhere; indices are
    truncated to integers, a negative one counts from the end, one outside [-depth, depth)
    gives a row of zeros (ONNX OneHot's rule)."""
    depth = ins.attrs["depth"][0]
    index = x.astype(np.int64)
    index = np.where(index < 0, index + depth, index)
    return (index[..., None] == np.arange(depth)).astype(np.float32)


def _one(fn: Callable[[Instr, np.ndarray], np.ndarray]) -> Kernel:
    """A kernel of one input and one output."""
    return lambda ins, args, weights: [fn(ins, args[0])]


def _two(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    """A kernel of two inputs and one output, broadcast as numpy does."""
    return lambda ins, args, weights: [fn(args[0], args[1])]


# -- ONNX forms -----------------------------------------------------------------------
def _same(onnx_op: str, **attrs: Callable[[dict], object]) -> GraphForm:
    """An ONNX operator taking the instruction's inputs, attributes computed from its attrs."""
    return lambda g, ins, x, y: g.node(onnx_op, x, y, ins, **{k: f(ins.attrs) for k, f in attrs.items()})


def _int(name: str) -> Callable[[dict], int]:
    return lambda a: a[name][0]


def _float(name: str) -> Callable[[dict], float]:
    return lambda a: float(a[name][0])


def _list(name: str) -> Callable[[dict], list]:
    return lambda a: a[name]


def _matmul_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    g.node("MatMul", [x[0], g.const("w", g.weights[ins.layer])], y, ins)


def conv_kernel(ins: Instr, matrices: list[np.ndarray]) -> np.ndarray:
    """A CONV's group matrices (Cg*K, Cog), rows in (channel, kernel offset) order, as one
    convolution kernel (C_out, Cg, *kernel) in ONNX / torch layout."""
    kernel = ins.attrs["kernel"]
    rows = matrices[0].shape[0] // int(np.prod(kernel))
    return np.ascontiguousarray(np.stack(matrices).transpose(0, 2, 1)).reshape(-1, rows, *kernel)


def _conv_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    matrices = [g.weights[ins.layer + i] for i in range(a["group"][0])]
    g.node("Conv", [x[0], g.const("w", conv_kernel(ins, matrices))], y, ins, kernel_shape=a["kernel"],
           strides=a["strides"], pads=a["pads"], dilations=a["dilations"], group=a["group"][0])


def _clip_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    g.node("Clip", [x[0], g.const("min", np.float32(a["min"][0])), g.const("max", np.float32(a["max"][0]))], y, ins)


def _avgpool_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    counted = a["count_include_pad"][0]
    if counted and any(a["ceil_pads"]) or any(d != 1 for d in a["dilations"]):
        raise NoGraphForm(f"AVGPOOL '{ins.name}': counted ceil_mode padding or dilation")
    g.node("AveragePool", x, y, ins, kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"],
           count_include_pad=counted)


def _reduce_graph(onnx_op: str) -> GraphForm:
    def form(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
        a = ins.attrs
        if not a["axes"]:
            raise NoGraphForm(f"{ins.op.name} '{ins.name}' over no axes")
        g.node(onnx_op, [x[0], g.const("axes", np.array(a["axes"], np.int64))], y, ins, keepdims=a["keepdims"][0])
    return form


def _reshape_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    # 0 keeps the input's dimension: the batch
    g.node("Reshape", [x[0], g.const("shape", np.array([0, *ins.attrs["shape"][1:]], np.int64))], y, ins)


def _split_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    g.node("Split", [x[0], g.const("sizes", np.array(a["sizes"], np.int64))], y, ins, axis=a["axis"][0])


INT64_MIN = np.iinfo(np.int64).min


def _slice_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    starts, counts, steps = a["starts"], a["counts"], a["steps"]
    ends = [s + c * st if s + c * st >= 0 else INT64_MIN for s, c, st in zip(starts, counts, steps)]
    g.node("Slice", [x[0], g.const("starts", np.array(starts, np.int64)), g.const("ends", np.array(ends, np.int64)),
                     g.const("axes", np.arange(1, len(starts) + 1, dtype=np.int64)),
                     g.const("steps", np.array(steps, np.int64))], y, ins)


def _pad_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    if any(p < 0 for p in a["pads"]):
        raise NoGraphForm(f"PAD '{ins.name}' with negative pads")
    g.node("Pad", [x[0], g.const("pads", np.array(a["pads"], np.int64)), g.const("value", np.float32(a["value"][0]))],
           y, ins, mode=PAD_MODES[a["mode"][0]])


def _lrn_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    a = ins.attrs
    if a["size"][0] % 2 == 0:
        raise NoGraphForm(f"LRN '{ins.name}' over an even number of channels (onnxruntime takes odd sizes)")
    g.node("LRN", x, y, ins, size=a["size"][0], alpha=float(a["alpha"][0]), beta=float(a["beta"][0]),
           bias=float(a["bias"][0]))


def _one_hot_graph(g: GraphBuilder, ins: Instr, x: list[str], y: list[str]) -> None:
    g.node("OneHot", [x[0], g.const("depth", np.float32(ins.attrs["depth"][0])),
                      g.const("values", np.array([0, 1], np.float32))], y, ins, axis=-1)


# -- the table ------------------------------------------------------------------------
_WINDOW = (
    Attr("kernel", "ints", "window size per spatial axis"),
    Attr("strides", "ints", "step per spatial axis"),
    Attr("pads", "ints", "padding, all begins then all ends, per spatial axis"),
    Attr("dilations", "ints", "spacing of window taps per spatial axis"),
)
_POOL_SHAPE = "(N, C, *O), O_i = (S_i + pad_begin_i + pad_end_i - (kernel_i - 1) * dilation_i - 1) // stride_i + 1"
_REDUCE = (Attr("axes", "ints", "axes reduced (>= 1, sorted)"), Attr("keepdims", "int", "1 keeps them as size 1"))
_SAME_AS_INPUT = "as x"
_BROADCAST = "broadcast of a and b"

_ROWS = (
    OpSpec(Opcode.MATMUL, "crossbar", "x", (), ("Gemm", "MatMul"), "(*x[:-1], out_features)",
           "`x @ W(layer)` over the last axis of x", _matmul, _matmul_graph),
    OpSpec(Opcode.CONV, "crossbar", "x (N, C, *S)", (*_WINDOW, Attr("group", "int", "number of channel groups")),
           ("Conv",), "(N, C_out, *O), C_out = group * out_features; O as for MAXPOOL",
           "convolution as im2col: each output position's window (rows in (channel, kernel offset) order) "
           "times W of layer `layer + g` for group g; `group` consecutive layers of shape "
           "(C/group * prod(kernel), C_out/group)", _conv, _conv_graph, shape_rule=_conv_shape),
    OpSpec(Opcode.ADD, "digital", "a, b", (), ("Add", "Sum"), _BROADCAST, "a + b", _two(np.add), _same("Add")),
    OpSpec(Opcode.SUB, "digital", "a, b", (), ("Sub",), _BROADCAST, "a - b", _two(np.subtract), _same("Sub")),
    OpSpec(Opcode.MUL, "digital", "a, b", (), ("Mul",), _BROADCAST, "a * b", _two(np.multiply), _same("Mul")),
    OpSpec(Opcode.DIV, "digital", "a, b", (), ("Div",), _BROADCAST, "a / b", _two(np.divide), _same("Div")),
    OpSpec(Opcode.PRELU, "digital", "x, slope", (), ("PRelu",), "broadcast of x and slope",
           "x if x >= 0 else slope * x",
           _two(lambda x, slope: np.where(x >= 0, x, slope * x)), _same("PRelu")),
    OpSpec(Opcode.RELU, "digital", "x", (), ("Relu",), _SAME_AS_INPUT, "max(x, 0)",
           _one(lambda ins, x: np.maximum(x, np.float32(0))), _same("Relu")),
    OpSpec(Opcode.LEAKY_RELU, "digital", "x", (Attr("alpha", "float", "slope below 0", 0.01),), ("LeakyRelu",),
           _SAME_AS_INPUT, "x if x >= 0 else alpha * x",
           _one(lambda ins, x: np.where(x >= 0, x, _f(ins, "alpha") * x)), _same("LeakyRelu", alpha=_float("alpha"))),
    OpSpec(Opcode.CLIP, "digital", "x", (Attr("min", "float", "lower bound (-inf when absent)"),
                                         Attr("max", "float", "upper bound (+inf when absent)")),
           ("Clip",), _SAME_AS_INPUT, "min(max(x, min), max)",
           _one(lambda ins, x: np.clip(x, _f(ins, "min"), _f(ins, "max"))), _clip_graph),
    OpSpec(Opcode.SIGMOID, "digital", "x", (), ("Sigmoid",), _SAME_AS_INPUT, "1 / (1 + exp(-x))",
           _one(lambda ins, x: _sigmoid(x)), _same("Sigmoid")),
    OpSpec(Opcode.TANH, "digital", "x", (), ("Tanh",), _SAME_AS_INPUT, "tanh(x)",
           _one(lambda ins, x: np.tanh(x)), _same("Tanh")),
    OpSpec(Opcode.ELU, "digital", "x", (Attr("alpha", "float", "scale of the negative part", 1.0),), ("Elu",),
           _SAME_AS_INPUT, "x if x > 0 else alpha * (exp(x) - 1)",
           _one(lambda ins, x: np.where(x > 0, x, _f(ins, "alpha") * np.expm1(x))),
           _same("Elu", alpha=_float("alpha"))),
    OpSpec(Opcode.SELU, "digital", "x",
           (Attr("alpha", "float", "scale of the negative part", 1.67326319217681884765625),
            Attr("gamma", "float", "scale of the result", 1.05070102214813232421875)),
           ("Selu",), _SAME_AS_INPUT, "gamma * (x if x > 0 else alpha * (exp(x) - 1))", _one(_selu),
           _same("Selu", alpha=_float("alpha"), gamma=_float("gamma"))),
    OpSpec(Opcode.SOFTPLUS, "digital", "x", (), ("Softplus",), _SAME_AS_INPUT, "log(1 + exp(x))",
           _one(lambda ins, x: np.logaddexp(np.float32(0), x)), _same("Softplus")),
    OpSpec(Opcode.SOFTSIGN, "digital", "x", (), ("Softsign",), _SAME_AS_INPUT, "x / (1 + abs(x))",
           _one(lambda ins, x: x / (1 + np.abs(x))), _same("Softsign")),
    OpSpec(Opcode.EXP, "digital", "x", (), ("Exp",), _SAME_AS_INPUT, "exp(x)",
           _one(lambda ins, x: np.exp(x)), _same("Exp")),
    OpSpec(Opcode.NEG, "digital", "x", (), ("Neg",), _SAME_AS_INPUT, "-x", _one(lambda ins, x: -x), _same("Neg")),
    OpSpec(Opcode.ABS, "digital", "x", (), ("Abs",), _SAME_AS_INPUT, "abs(x)",
           _one(lambda ins, x: np.abs(x)), _same("Abs")),
    OpSpec(Opcode.MAXPOOL, "digital", "x (N, C, *S)", _WINDOW, ("MaxPool",), _POOL_SHAPE,
           "max over each window; pads are -inf; the end pads include the extra ceil_mode needs",
           _one(lambda ins, x: _pool(ins, x, average=False)),
           _same("MaxPool", kernel_shape=_list("kernel"), strides=_list("strides"), pads=_list("pads"),
                 dilations=_list("dilations"))),
    OpSpec(Opcode.AVGPOOL, "digital", "x (N, C, *S)",
           (*_WINDOW, Attr("ceil_pads", "ints", "the part of the end pads that is ceil_mode's extra"),
            Attr("count_include_pad", "int", "1: explicit pads count in the divisor")),
           ("AveragePool",), _POOL_SHAPE,
           "mean over each window; the divisor counts input cells, plus explicit pads when "
           "`count_include_pad` is 1, never the `ceil_pads` part of the end pads",
           _one(lambda ins, x: _pool(ins, x, average=True)), _avgpool_graph),
    OpSpec(Opcode.GLOBAL_AVGPOOL, "digital", "x (N, C, *S)", (), ("GlobalAveragePool",), "(N, C, 1, ...)",
           "mean over S, kept as size-1 axes",
           _one(lambda ins, x: x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32)),
           _same("GlobalAveragePool")),
    OpSpec(Opcode.GLOBAL_MAXPOOL, "digital", "x (N, C, *S)", (), ("GlobalMaxPool",), "(N, C, 1, ...)",
           "max over S, kept as size-1 axes",
           _one(lambda ins, x: x.max(axis=tuple(range(2, x.ndim)), keepdims=True)), _same("GlobalMaxPool")),
    OpSpec(Opcode.SOFTMAX, "digital", "x", (Attr("axis", "int", "axis normalised (>= 1)"),), ("Softmax",),
           _SAME_AS_INPUT, "softmax along axis",
           _one(lambda ins, x: _softmax(x, ins.attrs["axis"][0], log=False)), _same("Softmax", axis=_int("axis"))),
    OpSpec(Opcode.LOG_SOFTMAX, "digital", "x", (Attr("axis", "int", "axis normalised (>= 1)"),), ("LogSoftmax",),
           _SAME_AS_INPUT, "log of softmax along axis",
           _one(lambda ins, x: _softmax(x, ins.attrs["axis"][0], log=True)), _same("LogSoftmax", axis=_int("axis"))),
    OpSpec(Opcode.REDUCE_MEAN, "digital", "x", _REDUCE, ("ReduceMean",), "x without axes (size 1 with keepdims)",
           "mean", _one(lambda ins, x: x.mean(**_reduce_args(ins), dtype=np.float32)), _reduce_graph("ReduceMean")),
    OpSpec(Opcode.REDUCE_SUM, "digital", "x", _REDUCE, ("ReduceSum",), "x without axes (size 1 with keepdims)",
           "sum", _one(lambda ins, x: x.sum(**_reduce_args(ins), dtype=np.float32)), _reduce_graph("ReduceSum")),
    OpSpec(Opcode.REDUCE_MAX, "digital", "x", _REDUCE, ("ReduceMax",), "x without axes (size 1 with keepdims)",
           "max", _one(lambda ins, x: x.max(**_reduce_args(ins))), _reduce_graph("ReduceMax")),
    OpSpec(Opcode.LRN, "digital", "x (N, C, *S)",
           (Attr("size", "int", "channels in each window"),
            Attr("alpha", "float", "scale of the sum of squares", 0.0001),
            Attr("beta", "float", "exponent", 0.75),
            Attr("bias", "float", "offset", 1.0)),
           ("LRN",), _SAME_AS_INPUT,
           "local response normalisation across channels: x / (bias + alpha / size * s)^beta, s the sum "
           "of x^2 over channels c - floor((size-1)/2) .. c + ceil((size-1)/2) (those that exist)",
           _one(_lrn), _lrn_graph),
    OpSpec(Opcode.RESHAPE, "digital", "x", (Attr("shape", "ints", "target shape, dim 0 is -1 (the batch)"),),
           ("Reshape", "Flatten", "Squeeze", "Unsqueeze"), "(N, *shape[1:])", "x reshaped",
           _one(lambda ins, x: x.reshape(x.shape[0], *ins.attrs["shape"][1:])), _reshape_graph, view=True),
    OpSpec(Opcode.TRANSPOSE, "digital", "x", (Attr("perm", "ints", "axis order, perm[0] = 0"),), ("Transpose",),
           "x's axes permuted by perm", "axes permuted",
           _one(lambda ins, x: x.transpose(ins.attrs["perm"])), _same("Transpose", perm=_list("perm")), view=True),
    OpSpec(Opcode.CONCAT, "digital", "x1, x2, ...", (Attr("axis", "int", "axis joined (>= 1)"),), ("Concat",),
           "x1 with axis the sum of the inputs' axis sizes", "concatenation",
           lambda ins, args, weights: [np.concatenate(args, axis=ins.attrs["axis"][0])],
           _same("Concat", axis=_int("axis"))),
    OpSpec(Opcode.SLICE, "digital", "x",
           (Attr("starts", "ints", "first index, per axis after the batch"),
            Attr("counts", "ints", "elements taken, per axis after the batch"),
            Attr("steps", "ints", "step (may be negative), per axis after the batch")),
           ("Slice",), "(N, *counts)",
           "`x[:, s1 : s1 + c1*p1 : p1, ...]` (a negative end means \"through index 0\")",
           _one(_slice), _slice_graph, view=True),
    OpSpec(Opcode.PAD, "digital", "x",
           (Attr("pads", "ints", "all begins then all ends, per axis (negative crops)"),
            Attr("mode", "int", "0 constant, 1 reflect, 2 edge, 3 wrap"),
            Attr("value", "float", "fill value of mode 0")),
           ("Pad",), "x's axis i grown by pads[i] + pads[rank + i]", "padded x (negative pads crop)",
           _one(_pad), _pad_graph),
    OpSpec(Opcode.SPLIT, "digital", "x", (Attr("axis", "int", "axis cut (>= 1)"),
                                          Attr("sizes", "ints", "size of each part along axis")),
           ("Split",), "one output per size: x with axis of that size", "x cut into consecutive parts",
           lambda ins, args, weights: np.split(args[0], np.cumsum(ins.attrs["sizes"])[:-1], axis=ins.attrs["axis"][0]),
           _split_graph, view=True),
    OpSpec(Opcode.ONE_HOT, "digital", "indices (N, *I), integer values held as float32",
           (Attr("depth", "int", "length of the new last axis (the table's rows)"),),
           ("Gather",), "(N, *I, depth)",
           "1.0 where the last axis equals the index (negative: counted from the end), else 0.0; an "
           "index outside [-depth, depth) gives zeros. A Gather from a constant table becomes ONE_HOT "
           "then MATMUL: the table's rows are read from the crossbar",
           _one(_one_hot), _one_hot_graph),
)

OPS: dict[Opcode, OpSpec] = {row.opcode: row for row in _ROWS}
_missing = [op.name for op in Opcode if op not in OPS]
if _missing or len(OPS) != len(_ROWS):
    raise RuntimeError(f"the op table must have exactly one row per opcode (missing {_missing})")


def by_onnx(*ops: str) -> dict[str, Opcode]:
    """ONNX operator -> the opcode it lowers to, for the given ONNX operators."""
    table = {name: row.opcode for row in _ROWS for name in row.onnx}
    return {name: table[name] for name in ops}


def execute(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """Run one instruction with its reference kernel."""
    spec = OPS.get(ins.op)
    if spec is None:
        raise ExecutionError(f"opcode {ins.op!r} has no implementation")
    return spec.kernel(ins, args, weights)


def output_shapes(ins: Instr, probes: list[np.ndarray], weights: WeightProvider) -> list[tuple[int, ...]]:
    """The shape rule: the shapes of an instruction's outputs for inputs shaped like ``probes``.

    Evaluated by running the reference kernel on the probes (a batch of one), so a shape
    can never disagree with what the op computes, except for an op whose row has a
    cheaper ``shape_rule`` (CONV: an im2col product per layer of a big model costs the
    compiler more than all else); invalid inputs raise ValueError or IndexError naming
    the problem.
    """
    spec = OPS.get(ins.op)
    if spec is not None and spec.shape_rule is not None:
        return spec.shape_rule(ins, probes, weights)
    with np.errstate(all="ignore"):
        return [tuple(r.shape) for r in execute(ins, probes, weights)]
