"""Runs a loaded program: crossbar layers through a weight provider, the rest digitally.

What every opcode computes is its reference kernel in the contract's op table
(``contract.ops``); this interpreter runs those kernels and adds what is the emulator's
own: the crossbar products in torch (2-3x faster than numpy's im2col) split over worker
threads, products formed tile by tile through finite converters (which also apply the
layer's bias ADD and RELU while their chunk of outputs is in cache, ``_epilogue``), and
elementwise ops that write into their input when nothing else can see it. The chip and the compiler's
reference executor differ only in where a layer's effective weights come from
(programmed conductances vs. ideal targets), so a mismatch between them points at the
cells, not at the op implementations.

``run`` hands a program whose products need no converters to ``graph_engine`` (the whole
program as one onnxruntime graph, several times faster on small models); this
interpreter runs the rest and is the yardstick the engine is tested against.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import graph_engine
from .contract import ops
from .contract.interpreter import bind_inputs, store_results
from .contract.ops import ExecutionError, WeightProvider
from .contract.program_format import Instr, Opcode, Program
from .converters import Epilogue, LayerProduct, ReadNoise, Windows

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


def _kernel(ins: Instr, matrices: list[np.ndarray]):
    """A CONV's group matrices (Cg*K, Cog) as one torch kernel (C_out, Cg, *kernel).

    Cached while the provider's arrays live (the chip keeps them per cell generation), so
    the transposing copy is paid once, not on every run.
    """
    key = tuple(map(id, matrices))
    hit = _kernels.get(key)
    if hit is not None and all(ref() is m for ref, m in zip(hit[0], matrices)):
        return hit[1]
    value = _torch().from_numpy(ops.conv_kernel(ins, matrices))
    layout = _channels_last(len(ins.attrs["kernel"]))
    if layout is not None:
        value = value.contiguous(memory_format=layout)
    _kernels[key] = (tuple(weakref.ref(m) for m in matrices), value)
    weakref.finalize(matrices[0], _kernels.pop, key, None)
    return value


def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider, product: LayerProduct | None = None,
            read_noise: ReadNoise | None = None, epilogue: Epilogue | None = None) -> np.ndarray:
    x, = args
    w = ops.matmul_layer(ins, x, weights)
    if product is not None:
        return product(ins.layer, x.reshape(-1, w.shape[0]), epilogue).reshape(*x.shape[:-1], w.shape[1])
    w_t = _tensor(w)
    y = _over_batch(lambda part: part @ w_t, _tensor(x), x.size * w.shape[1])
    if read_noise is not None:
        y += read_noise.draw(read_noise.maps(ins.layer).std(x, read_noise.sigma))
    return y


def _conv(ins: Instr, args: list[np.ndarray], weights: WeightProvider, product: LayerProduct | None = None,
          read_noise: ReadNoise | None = None, epilogue: Epilogue | None = None) -> np.ndarray:
    """out[n, o, p] = sum_r im2col(x)[n, p, r] * W[r, o], one matrix W per group, rows r in
    (channel, kernel offset) order: exactly a convolution with W reshaped to (C_out, C_in/g, *k)."""
    x, = args
    matrices = ops.conv_layers(ins, x, weights)                           # each (Cg*K, Cog)
    rows, cols = matrices[0].shape
    if product is not None:
        return _conv_tiled(ins, x, product, epilogue)
    y = _convolve(ins, x, _kernel(ins, matrices), rows * cols * len(matrices))
    if read_noise is not None:
        y += _conv_read_noise(ins, x, read_noise)
    return y


def _convolve(ins: Instr, x: np.ndarray, kernel_t, macs_per_position: int) -> np.ndarray:
    """The CONV of x with a torch kernel (C_out, Cg, *kernel), on the workers."""
    a = ins.attrs
    kernel, group, pads, strides, dilations = a["kernel"], a["group"][0], a["pads"], a["strides"], a["dilations"]
    nd = len(kernel)
    positions = np.prod(ops.window_positions(ins, x.shape[2:]))
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

    return _over_batch(run, _tensor(x), int(x.shape[0] * positions * macs_per_position))


def _conv_read_noise(ins: Instr, x: np.ndarray, noise: ReadNoise) -> np.ndarray:
    """Read noise of a CONV through ideal converters, one Gaussian per output: each window's
    squared norm over every tile row block (a convolution of x^2 with 0/1 kernels), then
    the layer's ReadNoiseMap turns them into each output's std."""
    group = ins.attrs["group"][0]
    maps = [noise.maps(ins.layer + g) for g in range(group)]
    blocks = max(m.rows.shape[1] for m in maps)
    indicators = [np.pad(m.rows, ((0, 0), (0, blocks - m.rows.shape[1]))) for m in maps]
    kernel_t = _torch().from_numpy(np.ascontiguousarray(ops.conv_kernel(ins, indicators)))
    norms = np.moveaxis(_convolve(ins, np.square(x), kernel_t, blocks * len(maps[0].rows) * group), 1, -1)
    std = np.concatenate([m.std_from_norms(norms[..., g * blocks:g * blocks + m.rows.shape[1]], noise.sigma)
                          for g, m in enumerate(maps)], axis=-1)                  # (N, *positions, C_out)
    return np.moveaxis(noise.draw(std), -1, 1)


def _conv_tiled(ins: Instr, x: np.ndarray, product: LayerProduct, epilogue: Epilogue | None = None) -> np.ndarray:
    """Convolution as the crossbars see it: the im2col rows of each group's windows through its
    layer (``epilogue``: only for one group)."""
    windows, group = Windows(ops.windows(ins, x)), ins.attrs["group"][0]
    if group == 1:
        return product(ins.layer, windows, epilogue)
    planes = [product(ins.layer + g, windows.group(g, group)) for g in range(group)]   # each (N, C_out / group, *O)
    return np.concatenate(planes, axis=1)


def _epilogue(program: Program, at: int, last_use: dict[int, int], rank: int) -> tuple[Epilogue | None, int]:
    """The bias ADD and RELU that follow crossbar instruction ``at`` and that its product through
    the converters can apply itself (``Epilogue``): (the epilogue or None, the last instruction it covers).

    Only what nothing else sees: each intermediate is read once, by the next instruction, and
    is no program output; the bias is a float32 constant, one value or one per output along
    the output axis (1 for a CONV, the last for a MATMUL), so it leaves the output's shape as
    it is (``rank``: the crossbar output's).
    """
    steps, ins = program.instructions, program.instructions[at]
    if ins.op == Opcode.CONV and ins.attrs["group"][0] != 1:
        return None, at
    axis = 1 if ins.op == Opcode.CONV else rank - 1
    last, tensor, bias, relu = at, ins.outputs[0], None, False

    def consumes(step: int, op: Opcode) -> bool:
        nxt = steps[step] if step < len(steps) else None
        return nxt is not None and nxt.op == op and nxt.inputs[0] == tensor and nxt.inputs.count(tensor) == 1 \
            and last_use.get(tensor) == step

    if consumes(last + 1, Opcode.ADD) and len(steps[last + 1].inputs) == 2:
        b = program.constants.get(steps[last + 1].inputs[1])
        shape = (1,) * (rank - b.ndim) + b.shape if b is not None else ()
        if b is not None and b.dtype == np.float32 and b.ndim <= rank \
                and b.size in (1, program.layers[ins.layer].out_features) \
                and all(n == 1 for i, n in enumerate(shape) if i != axis):
            last += 1
            tensor = steps[last].outputs[0]
            bias = b.reshape(-1)
    if consumes(last + 1, Opcode.RELU):
        last += 1
        tensor, relu = steps[last].outputs[0], True
    if last == at:
        return None, at
    return Epilogue(bias, relu), last


def execute(ins: Instr, args: list[np.ndarray], weights: WeightProvider, product: LayerProduct | None = None,
            read_noise: ReadNoise | None = None, epilogue: Epilogue | None = None) -> list[np.ndarray]:
    """Run one instruction on its input arrays: the crossbar ops in torch (or through
    ``product``, finite converters, which then applies ``epilogue``; or with ``read_noise``
    added to each output), every other op with its reference kernel."""
    if ins.op == Opcode.MATMUL:
        return [_matmul(ins, args, weights, product, read_noise, epilogue)]
    if ins.op == Opcode.CONV:
        return [_conv(ins, args, weights, product, read_noise, epilogue)]
    return ops.execute(ins, args, weights)


# ops that may write their result into their first input; an op whose outputs are views of
# its input (the table's ``view``) makes neither writable while the other is alive
_IN_PLACE: dict[Opcode, Callable[[Instr, list[np.ndarray]], np.ndarray]] = {
    Opcode.RELU: lambda ins, a: np.maximum(a[0], np.float32(0), out=a[0]),
    Opcode.CLIP: lambda ins, a: np.clip(a[0], np.float32(ins.attrs["min"][0]), np.float32(ins.attrs["max"][0]),
                                        out=a[0]),
    Opcode.ADD: lambda ins, a: np.add(a[0], a[1], out=a[0]),
    Opcode.SUB: lambda ins, a: np.subtract(a[0], a[1], out=a[0]),
    Opcode.MUL: lambda ins, a: np.multiply(a[0], a[1], out=a[0]),
    Opcode.DIV: lambda ins, a: np.divide(a[0], a[1], out=a[0]),
}


def run(program: Program, feeds: list[np.ndarray], weights: WeightProvider,
        product: LayerProduct | None = None, *, engine: bool = True,
        read_noise: ReadNoise | None = None) -> list[np.ndarray]:
    """Execute ``program`` on ``feeds`` (one array per program input, batch first).

    ``engine``: run the whole program as one onnxruntime graph (``graph_engine``) where it
    can be expressed as one and the products need no converters and no read noise (the
    graph does not carry it); otherwise, or with ``engine=False``, interpret it
    instruction by instruction. ``read_noise``: add to every crossbar product its read
    noise through ideal converters (with ``product``, the product adds its own).
    """
    env = bind_inputs(program, feeds)
    if engine and product is None and read_noise is None:
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
    i = 0
    while i < len(steps):
        ins, last, epilogue = steps[i], i, None
        try:
            args = [env[t] for t in ins.inputs]
            first = ins.inputs[0] if ins.inputs else -1
            if ins.op in _IN_PLACE and first in owned and last_use[first] == i and ins.inputs.count(first) == 1 \
                    and np.broadcast_shapes(*(a.shape for a in args)) == args[0].shape:
                outs = [_IN_PLACE[ins.op](ins, args)]
            else:
                if product is not None and ins.op in (Opcode.CONV, Opcode.MATMUL):   # its bias and RELU with it
                    epilogue, last = _epilogue(program, i, last_use, args[0].ndim)
                outs = execute(ins, args, weights, product, read_noise, epilogue)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {e}") from None
        store_results(steps[last], outs, env)
        if ops.OPS[ins.op].view:
            owned.difference_update(ins.inputs)
        else:
            owned.update(steps[last].outputs)
        i = last + 1
    return [env[t] for t in program.outputs]
