"""Runs a loaded program: crossbar layers through a weight provider, the rest digitally.

The chip and the compiler's reference executor share this interpreter and differ only in
where a layer's effective weights come from (programmed conductances vs. ideal targets),
so a mismatch between them points at the cells, not at the op implementations.

Every op is vectorised over the whole batch; convolutions are an im2col view of the
input (no copy until the matmul needs one) times the layer's effective weight matrix.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .program_format import Instr, Opcode, Program

WeightProvider = Callable[[int], np.ndarray]  # layer index -> (in_features, out_features) float32


class ExecutionError(ValueError):
    """The program cannot run on the given inputs; names the instruction."""


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


# -- crossbar ops ---------------------------------------------------------------------
def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> np.ndarray:
    x, = args
    w = weights(ins.layer)
    if x.shape[-1] != w.shape[0]:
        raise ExecutionError(f"input has {x.shape[-1]} features, layer expects {w.shape[0]}")
    return x @ w


def windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
            pads: list[int], pad_value: float = 0.0) -> np.ndarray:
    """View x (N, C, *S) as (N, C, *O, *K): every kernel window, padded, strided, dilated.

    Only the padding copies; the windows are a strided view of the padded input.
    """
    nd = len(kernel)
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:nd], pads[nd:])), constant_values=pad_value)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    v = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    return v[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
             + tuple(slice(None, None, d) for d in dilations)]


def _conv(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> np.ndarray:
    """im2col: rows of the im2col matrix are (channel, kernel offset), as in the layer matrix."""
    x, = args
    a = ins.attrs
    kernel, group = a["kernel"], a["group"][0]
    nd = len(kernel)
    w = np.stack([weights(ins.layer + g) for g in range(group)])         # (G, Cg*K, Cog)
    n, c = x.shape[:2]
    if c % group or w.shape[1] != c // group * int(np.prod(kernel)):
        raise ExecutionError(f"input has {c} channels, {group} layer(s) of {w.shape[1]} rows expect "
                             f"{w.shape[1] * group // int(np.prod(kernel))}")
    if all(k == 1 for k in kernel) and all(s == 1 for s in a["strides"]) and not any(a["pads"]):
        spatial = x.shape[2:]
        cols = x.reshape(n, group, c // group, -1)                        # 1x1: no im2col at all
    else:
        v = windows(x, kernel, a["strides"], a["dilations"], a["pads"])   # (N, C, *O, *K)
        spatial = v.shape[2:2 + nd]
        order = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))     # (N, C, *K, *O)
        cols = v.transpose(order).reshape(n, group, w.shape[1], -1)     # the one copy
    out = np.matmul(w.transpose(0, 2, 1), cols)                           # (N, G, Cog, L)
    return out.reshape(n, group * w.shape[2], *spatial)


# -- digital ops ----------------------------------------------------------------------
def _pool(ins: Instr, x: np.ndarray, average: bool) -> np.ndarray:
    a = ins.attrs
    nd = len(a["kernel"])
    axes = tuple(range(-nd, 0))
    if not average:
        return windows(x, a["kernel"], a["strides"], a["dilations"], a["pads"], -np.inf).max(axis=axes)
    total = windows(x, a["kernel"], a["strides"], a["dilations"], a["pads"]).sum(axis=axes, dtype=np.float32)
    # divisor: the input cells of each window, plus its explicit pads if count_include_pad;
    # the extra end padding ceil_mode adds never counts
    pads, extra = a["pads"], a["ceil_pads"]
    include = bool(a["count_include_pad"][0])
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    explicit = [p - e for p, e in zip(pads[nd:], extra)]
    if include:
        ones = np.pad(ones, [(0, 0), (0, 0)] + list(zip(pads[:nd], explicit)), constant_values=1.0)
        inner = [0] * nd + list(extra)
    else:
        inner = pads
    count = windows(ones, a["kernel"], a["strides"], a["dilations"], inner).sum(axis=axes, dtype=np.float32)
    return total / count


def _softmax(x: np.ndarray, axis: int, log: bool) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=axis, keepdims=True)
    return shifted - np.log(s) if log else e / s


_PAD_MODES = {0: "constant", 1: "reflect", 2: "edge", 3: "wrap"}


def _pad(ins: Instr, x: np.ndarray) -> np.ndarray:
    a = ins.attrs
    pads = a["pads"]
    nd = x.ndim
    crop = tuple(slice(max(-b, 0), x.shape[i] - max(-e, 0)) for i, (b, e) in enumerate(zip(pads[:nd], pads[nd:])))
    x = x[crop]  # negative pads remove elements
    width = [(max(b, 0), max(e, 0)) for b, e in zip(pads[:nd], pads[nd:])]
    mode = _PAD_MODES[a["mode"][0]]
    if mode == "constant":
        return np.pad(x, width, constant_values=np.float32(a["value"][0]))
    return np.pad(x, width, mode=mode)


def _slice(ins: Instr, x: np.ndarray) -> np.ndarray:
    a = ins.attrs
    index = []
    for start, count, step in zip(a["starts"], a["counts"], a["steps"]):
        stop = start + count * step
        index.append(slice(start, stop if stop >= 0 else None, step))
    return x[tuple(index)]


def _split(ins: Instr, x: np.ndarray) -> list[np.ndarray]:
    axis = ins.attrs["axis"][0]
    return np.split(x, np.cumsum(ins.attrs["sizes"])[:-1], axis=axis)


def _reshape(ins: Instr, x: np.ndarray) -> np.ndarray:
    shape = ins.attrs["shape"]
    return x.reshape(x.shape[0], *shape[1:])


def _f(ins: Instr, name: str) -> np.float32:
    return np.float32(ins.attrs[name][0])


def _selu(ins: Instr, x: np.ndarray) -> np.ndarray:
    alpha, gamma = _f(ins, "alpha"), _f(ins, "gamma")
    return gamma * np.where(x > 0, x, alpha * np.expm1(x))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| only: no overflow for large negative inputs
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_UNARY: dict[Opcode, Callable[[Instr, np.ndarray], np.ndarray]] = {
    Opcode.RELU: lambda ins, x: np.maximum(x, np.float32(0)),
    Opcode.LEAKY_RELU: lambda ins, x: np.where(x >= 0, x, _f(ins, "alpha") * x),
    Opcode.CLIP: lambda ins, x: np.clip(x, _f(ins, "min"), _f(ins, "max")),
    Opcode.SIGMOID: lambda ins, x: _sigmoid(x),
    Opcode.TANH: lambda ins, x: np.tanh(x),
    Opcode.ELU: lambda ins, x: np.where(x > 0, x, _f(ins, "alpha") * np.expm1(x)),
    Opcode.SELU: _selu,
    Opcode.SOFTPLUS: lambda ins, x: np.logaddexp(np.float32(0), x),
    Opcode.SOFTSIGN: lambda ins, x: x / (1 + np.abs(x)),
    Opcode.EXP: lambda ins, x: np.exp(x),
    Opcode.NEG: lambda ins, x: -x,
    Opcode.ABS: lambda ins, x: np.abs(x),
    Opcode.MAXPOOL: lambda ins, x: _pool(ins, x, average=False),
    Opcode.AVGPOOL: lambda ins, x: _pool(ins, x, average=True),
    Opcode.GLOBAL_AVGPOOL: lambda ins, x: x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32),
    Opcode.GLOBAL_MAXPOOL: lambda ins, x: x.max(axis=tuple(range(2, x.ndim)), keepdims=True),
    Opcode.SOFTMAX: lambda ins, x: _softmax(x, ins.attrs["axis"][0], log=False),
    Opcode.LOG_SOFTMAX: lambda ins, x: _softmax(x, ins.attrs["axis"][0], log=True),
    Opcode.RESHAPE: _reshape,
    Opcode.TRANSPOSE: lambda ins, x: x.transpose(ins.attrs["perm"]),
    Opcode.SLICE: _slice,
    Opcode.PAD: _pad,
}

_BINARY: dict[Opcode, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    Opcode.ADD: np.add,
    Opcode.SUB: np.subtract,
    Opcode.MUL: np.multiply,
    Opcode.DIV: np.divide,
    Opcode.PRELU: lambda x, slope: np.where(x >= 0, x, slope * x),
}


def execute(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """Run one instruction on its input arrays; the compiler also uses it to learn output shapes."""
    op = ins.op
    if op == Opcode.MATMUL:
        return [_matmul(ins, args, weights)]
    if op == Opcode.CONV:
        return [_conv(ins, args, weights)]
    if op in _UNARY:
        return [_UNARY[op](ins, args[0])]
    if op in _BINARY:
        return [_BINARY[op](args[0], args[1])]
    if op == Opcode.CONCAT:
        return [np.concatenate(args, axis=ins.attrs["axis"][0])]
    if op == Opcode.SPLIT:
        return _split(ins, args[0])
    raise ExecutionError(f"opcode {op!r} has no implementation")


def run(program: Program, feeds: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """Execute ``program`` on ``feeds`` (one array per program input, batch first)."""
    if len(feeds) != len(program.inputs):
        raise ExecutionError(f"program takes {len(program.inputs)} inputs, got {len(feeds)}")
    env: dict[int, np.ndarray] = dict(program.constants)
    for tid, x in zip(program.inputs, feeds):
        decl = program.tensors[tid]
        want = tuple(decl.shape[1:])
        if tuple(x.shape[1:]) != want:
            raise ExecutionError(f"input '{decl.name}' has shape {tuple(x.shape)}, "
                                 f"expected (batch, {', '.join(map(str, want))})")
        env[tid] = np.asarray(x, dtype=np.float32)
    for ins in program.instructions:
        try:
            args = [env[t] for t in ins.inputs]
            outs = execute(ins, args, weights)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {e}") from None
        if len(outs) != len(ins.outputs):
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {len(outs)} results for {len(ins.outputs)} outputs")
        for tid, out in zip(ins.outputs, outs):
            env[tid] = out.astype(np.float32, copy=False)
    return [env[t] for t in program.outputs]
