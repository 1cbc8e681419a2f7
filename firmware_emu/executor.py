"""Runs a loaded program: crossbar layers through a weight provider, the rest digitally.

The chip and the compiler's reference executor share this interpreter and differ only in
where a layer's effective weights come from (programmed conductances vs. ideal targets),
so a mismatch between them points at the cells, not at the op implementations.

``run`` hands a program whose products need no converters to ``graph_engine`` (the whole
program as one onnxruntime graph, several times faster on small models); this
interpreter runs the rest, teaches the compiler its output shapes, and is the yardstick
the engine is tested against.

Every op is vectorised over the whole batch. A convolution is the im2col product of the
input's windows with the layer's effective weight matrix, computed by torch's convolution
kernels on that matrix reshaped to a kernel (the same sums, without materialising the
windows); pools reduce one kernel offset at a time; elementwise ops write into their input
when nothing else can see it.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import graph_engine
from .converters import LayerProduct
from .contract.program_format import Instr, Opcode, Program

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
# The matrix products run in torch: its kernels are 2-3x faster than numpy's im2col here.
# They run on a few worker threads, each with a single-threaded torch, over slices of the
# batch: no OpenMP team has to wait at a barrier for a thread another process pushed off
# a core (measured on two busy cores: a batch-1 VGG conv took 32 ms on torch's 2-thread
# pool and 3 ms on one thread), and a free worker takes the next slice while one is stalled.
# The matrix is always the provider's.
_SPLIT_MACS = 1 << 23  # below this many multiply-adds, one slice: splitting costs more than it saves
_workers_lock = threading.Lock()
_worker_pool: tuple[int, ThreadPoolExecutor, int] | None = None  # (pid, pool, workers)


def _torch():
    import torch  # deferred: a chip that never runs a program does not pay for the import

    return torch


def _workers() -> tuple[ThreadPoolExecutor, int]:
    """The worker pool, as many threads as torch would use; made again after a fork."""
    global _worker_pool
    with _workers_lock:
        if _worker_pool is None or _worker_pool[0] != os.getpid():
            torch = _torch()
            workers = max(1, torch.get_num_threads())
            _worker_pool = (os.getpid(), ThreadPoolExecutor(workers, "nvcim-mvm", torch.set_num_threads, (1,)),
                            workers)
        return _worker_pool[1], _worker_pool[2]


def _over_batch(fn: Callable, x, macs: int) -> np.ndarray:
    """fn(x) computed on the workers, x cut along the batch into up to two slices per worker;
    a small product runs here, with torch held to one thread, to spare the hand-over."""
    pool, workers = _workers()
    n = x.shape[0]
    parts = 1 if macs < _SPLIT_MACS else min(n, 2 * workers)
    if parts == 1:
        torch = _torch()
        with _workers_lock:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(x).numpy()
            finally:
                torch.set_num_threads(threads)
    cuts = np.linspace(0, n, parts + 1).astype(int)
    outs = [f.result().numpy() for f in [pool.submit(fn, x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]]
    # joined by numpy (a torch op on this thread would wake torch's own multi-threaded pool),
    # into an array with the slices' memory layout (channels-last stays channels-last)
    out = np.empty_like(outs[0], shape=(n, *outs[0].shape[1:]))
    for a, b, part in zip(cuts[:-1], cuts[1:], outs):
        out[a:b] = part
    return out


def _tensor(x: np.ndarray):
    """A torch view of x (a copy only where torch cannot view it: negative strides, read-only)."""
    if not x.flags.writeable or any(st < 0 for st in x.strides):
        x = np.array(x)
    return _torch().from_numpy(x)


_kernels: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], object]] = {}


def _channels_last(nd: int):
    """torch's channels-last memory format for nd spatial dims (None for 1-D): its convolutions
    are up to 7x faster in it for few input channels, and never much slower."""
    torch = _torch()
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd)


def _kernel(matrices: list[np.ndarray], kernel: list[int]):
    """The group matrices (Cg*K, Cog) as one torch kernel (C_out, Cg, *kernel).

    Cached while the provider's arrays live (the chip keeps them per cell generation), so
    the transposing copy is paid once, not on every run.
    """
    key = tuple(map(id, matrices))
    hit = _kernels.get(key)
    if hit is not None and all(ref() is m for ref, m in zip(hit[0], matrices)):
        return hit[1]
    rows = matrices[0].shape[0] // int(np.prod(kernel))
    stacked = np.stack(matrices).transpose(0, 2, 1)                       # (G, Cog, Cg*K)
    value = _torch().from_numpy(np.ascontiguousarray(stacked).reshape(-1, rows, *kernel))
    layout = _channels_last(len(kernel))
    if layout is not None:
        value = value.contiguous(memory_format=layout)
    _kernels[key] = (tuple(weakref.ref(m) for m in matrices), value)
    weakref.finalize(matrices[0], _kernels.pop, key, None)
    return value


def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider,
            product: LayerProduct | None = None) -> np.ndarray:
    x, = args
    w = weights(ins.layer)
    if x.shape[-1] != w.shape[0]:
        raise ExecutionError(f"input has {x.shape[-1]} features, layer expects {w.shape[0]}")
    if product is not None:
        return product(ins.layer, x.reshape(-1, w.shape[0])).reshape(*x.shape[:-1], w.shape[1])
    w_t = _tensor(w)
    return _over_batch(lambda part: part @ w_t, _tensor(x), x.size * w.shape[1])


def _conv(ins: Instr, args: list[np.ndarray], weights: WeightProvider,
          product: LayerProduct | None = None) -> np.ndarray:
    """out[n, o, p] = sum_r im2col(x)[n, p, r] * W[r, o], one matrix W per group, rows r in
    (channel, kernel offset) order: exactly a convolution with W reshaped to (C_out, C_in/g, *k)."""
    x, = args
    a = ins.attrs
    kernel, group, pads, strides, dilations = a["kernel"], a["group"][0], a["pads"], a["strides"], a["dilations"]
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
    if product is not None:
        return _conv_tiled(ins, x, rows, product)
    kernel_t = _kernel(matrices, kernel)
    positions = np.prod([(n + pads[i] + pads[nd + i] - (k - 1) * d - 1) // s + 1
                         for i, (n, k, s, d) in enumerate(zip(x.shape[2:], kernel, strides, dilations))])
    functional = _torch().nn.functional
    conv = getattr(functional, f"conv{nd}d")
    symmetric = pads[:nd] == pads[nd:]
    # torch pads symmetrically only; F.pad takes the last axis first
    widths = [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])]

    layout = _channels_last(nd)

    def run(part):
        if layout is not None:
            part = part.contiguous(memory_format=layout)
        if not symmetric:
            part = functional.pad(part, widths)
        return conv(part, kernel_t, stride=strides, dilation=dilations, groups=group,
                    padding=pads[:nd] if symmetric else 0)

    return _over_batch(run, _tensor(x), int(x.shape[0] * positions * rows * cols * group))


def _conv_tiled(ins: Instr, x: np.ndarray, rows: int, product: LayerProduct) -> np.ndarray:
    """Convolution as the crossbars see it: explicit im2col rows through each group's layer."""
    a = ins.attrs
    kernel, group, pads = a["kernel"], a["group"][0], a["pads"]
    nd = len(kernel)
    padded = _pad_spatial(x, pads, nd, 0.0)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, a["dilations"])]
    v = sliding_window_view(padded, span, axis=tuple(range(2, 2 + nd)))
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in a["strides"])
          + tuple(slice(None, None, d) for d in a["dilations"])]               # (N, C, *O, *K)
    n, spatial = x.shape[0], v.shape[2:2 + nd]
    cols = v.transpose(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)).reshape(-1, group * rows)
    out = np.concatenate([product(ins.layer + g, cols[:, g * rows:(g + 1) * rows]) for g in range(group)], axis=1)
    return np.moveaxis(out.reshape(n, *spatial, -1), -1, 1)


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


def execute(ins: Instr, args: list[np.ndarray], weights: WeightProvider,
            product: LayerProduct | None = None) -> list[np.ndarray]:
    """Run one instruction on its input arrays; the compiler also uses it to learn output shapes.

    ``product``: form crossbar products tile by tile through it (finite converters)
    instead of multiplying by the effective matrix.
    """
    op = ins.op
    if op == Opcode.MATMUL:
        return [_matmul(ins, args, weights, product)]
    if op == Opcode.CONV:
        return [_conv(ins, args, weights, product)]
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


def run(program: Program, feeds: list[np.ndarray], weights: WeightProvider,
        product: LayerProduct | None = None, *, engine: bool = True) -> list[np.ndarray]:
    """Execute ``program`` on ``feeds`` (one array per program input, batch first).

    ``engine``: run the whole program as one onnxruntime graph (``graph_engine``) where it
    can be expressed as one and the products need no converters; otherwise, or with
    ``engine=False``, interpret it instruction by instruction.
    """
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
    if engine and product is None:
        graph = graph_engine.graph_for(program, weights)
        if graph is not None:
            try:
                return graph.run([env[t] for t in program.inputs])
            except Exception as e:  # noqa: BLE001 - the inputs were checked: the graph is at fault
                graph_engine.decline(program, weights, e)
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
                outs = execute(ins, args, weights, product)
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
