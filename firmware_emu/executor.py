"""Runs a loaded program: crossbar layers through a weight provider, the rest digitally.

The chip and the compiler's reference executor share this interpreter and differ only in
where a layer's effective weights come from (programmed conductances vs. ideal targets),
so a mismatch between them points at the cells, not at the op implementations.

Every op is vectorised over the whole batch. A convolution is the im2col product of the
input's windows with the layer's effective weight matrix; pools reduce one kernel offset
at a time. Elementwise ops write into their input when nothing else can see it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

import numpy as np

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
# The matrix products run in torch: its kernels are 2-3x faster than numpy's im2col on this
# class of machine, and keeping every BLAS call in one threading runtime avoids OpenBLAS and
# OpenMP threads fighting over the cores. The matrix is always the provider's.
def _torch():
    import torch  # deferred: a chip that never runs a program does not pay for the import

    return torch


# Below this many multiply-adds one thread beats waking torch's pool, and cannot stall on a
# pool thread that another process has pushed off a core (measured: a 2M-MAC conv took
# 0.3 ms alone and 30 ms with two threads on two busy cores).
_POOL_MACS = 1 << 23
_THREADS = threading.Lock()  # torch's thread count is process-wide: one toggle at a time


@contextmanager
def _threads_for(macs: int):
    torch = _torch()
    if macs >= _POOL_MACS:
        yield
        return
    with _THREADS:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _tensor(x: np.ndarray):
    """A torch view of x (a copy only where torch cannot view it: negative strides, read-only)."""
    if not x.flags.writeable or any(st < 0 for st in x.strides):
        x = np.array(x)
    return _torch().from_numpy(x)


def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> np.ndarray:
    x, = args
    w = weights(ins.layer)
    if x.shape[-1] != w.shape[0]:
        raise ExecutionError(f"input has {x.shape[-1]} features, layer expects {w.shape[0]}")
    with _threads_for(x.size * w.shape[1]):
        return (_tensor(x) @ _tensor(w)).numpy()


def _conv(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> np.ndarray:
    """out[n, o, p] = sum_r im2col(x)[n, p, r] * W[r, o], one matrix W per group, rows r in
    (channel, kernel offset) order: exactly a convolution with W reshaped to (C_out, C_in/g, *k)."""
    x, = args
    a = ins.attrs
    kernel, group, pads = a["kernel"], a["group"][0], a["pads"]
    nd = len(kernel)
    w = np.stack([weights(ins.layer + g) for g in range(group)])         # (G, Cg*K, Cog)
    channels = x.shape[1]
    if channels % group or w.shape[1] != channels // group * int(np.prod(kernel)):
        raise ExecutionError(f"input has {channels} channels, {group} layer(s) of {w.shape[1]} rows expect "
                             f"{w.shape[1] * group // int(np.prod(kernel))}")
    if nd > 3:
        raise ExecutionError(f"{nd}-D convolution: the chip's windows are 1-D to 3-D")
    kernel_t = _tensor(np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1, channels // group, *kernel))
    positions = np.prod([(n + pads[i] + pads[nd + i] - (k - 1) * d - 1) // s + 1 for i, (n, k, s, d) in
                         enumerate(zip(x.shape[2:], kernel, a["strides"], a["dilations"]))])
    functional = _torch().nn.functional
    with _threads_for(int(x.shape[0] * positions * w.size)):
        x_t = _tensor(x)
        if any(pads):
            # torch pads symmetrically only; F.pad takes the last axis first
            x_t = functional.pad(x_t, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])])
        conv = getattr(functional, f"conv{nd}d")
        return conv(x_t, kernel_t, stride=a["strides"], dilation=a["dilations"], groups=group).numpy()


# -- digital ops ----------------------------------------------------------------------
def _window_reduce(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
                   reduce: np.ufunc) -> np.ndarray:
    """Reduce every window of an (already padded) x (N, C, *S) with ``reduce`` (maximum, add).

    One vectorised pass per kernel offset (prod(kernel) passes), never one per pixel.
    """
    nd = len(kernel)
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


def _pad_spatial(x: np.ndarray, pads: list[int], nd: int, value: float) -> np.ndarray:
    if not any(pads):
        return x
    return np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:nd], pads[nd:])), constant_values=value)


def _pool(ins: Instr, x: np.ndarray, average: bool) -> np.ndarray:
    a = ins.attrs
    kernel, strides, dilations, pads = a["kernel"], a["strides"], a["dilations"], a["pads"]
    nd = len(kernel)
    if not average:
        return _window_reduce(_pad_spatial(x, pads, nd, -np.inf), kernel, strides, dilations, np.maximum)
    total = _window_reduce(_pad_spatial(x, pads, nd, 0.0), kernel, strides, dilations, np.add)
    # divisor: the input cells of each window, plus its explicit pads if count_include_pad;
    # the extra end padding ceil_mode adds never counts
    extra = a["ceil_pads"]
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    if a["count_include_pad"][0]:
        explicit = [p - e for p, e in zip(pads[nd:], extra)]
        ones = _pad_spatial(ones, pads[:nd] + explicit, nd, 1.0)
        ones = _pad_spatial(ones, [0] * nd + list(extra), nd, 0.0)
    else:
        ones = _pad_spatial(ones, pads, nd, 0.0)
    total /= _window_reduce(ones, kernel, strides, dilations, np.add)
    return total


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
    index = [slice(None)]  # the batch, then one (start, count, step) per axis after it
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


def _reduce_args(ins: Instr) -> dict:
    return dict(axis=tuple(ins.attrs["axes"]), keepdims=bool(ins.attrs["keepdims"][0]))


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
    Opcode.REDUCE_MEAN: lambda ins, x: x.mean(**_reduce_args(ins), dtype=np.float32),
    Opcode.REDUCE_SUM: lambda ins, x: x.sum(**_reduce_args(ins), dtype=np.float32),
    Opcode.REDUCE_MAX: lambda ins, x: x.max(**_reduce_args(ins)),
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


# ops that may write their result into their first input, and ops whose outputs are views
# of their input (so neither may later be overwritten while the other is alive)
_IN_PLACE: dict[Opcode, Callable[[Instr, list[np.ndarray]], np.ndarray]] = {
    Opcode.RELU: lambda ins, a: np.maximum(a[0], np.float32(0), out=a[0]),
    Opcode.CLIP: lambda ins, a: np.clip(a[0], _f(ins, "min"), _f(ins, "max"), out=a[0]),
    Opcode.ADD: lambda ins, a: np.add(a[0], a[1], out=a[0]),
    Opcode.SUB: lambda ins, a: np.subtract(a[0], a[1], out=a[0]),
    Opcode.MUL: lambda ins, a: np.multiply(a[0], a[1], out=a[0]),
    Opcode.DIV: lambda ins, a: np.divide(a[0], a[1], out=a[0]),
}
_VIEWS = {Opcode.RESHAPE, Opcode.TRANSPOSE, Opcode.SLICE, Opcode.SPLIT}


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
    steps = program.instructions
    last_use = {t: i for i, ins in enumerate(steps) for t in ins.inputs}
    last_use.update({t: len(steps) for t in program.outputs})
    owned: set[int] = set()  # intermediates whose array no other live tensor shares
    for i, ins in enumerate(steps):
        try:
            args = [env[t] for t in ins.inputs]
            first = ins.inputs[0] if ins.inputs else -1
            if ins.op in _IN_PLACE and first in owned and last_use[first] == i and ins.inputs.count(first) == 1 \
                    and np.broadcast_shapes(*(a.shape for a in args)) == args[0].shape:
                outs = [_IN_PLACE[ins.op](ins, args)]
            else:
                outs = execute(ins, args, weights)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {e}") from None
        if len(outs) != len(ins.outputs):
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {len(outs)} results for {len(ins.outputs)} outputs")
        for tid, out in zip(ins.outputs, outs):
            env[tid] = out.astype(np.float32, copy=False)
        if ins.op in _VIEWS:
            owned.difference_update(ins.inputs)
        else:
            owned.update(ins.outputs)
    return [env[t] for t in program.outputs]
