"""Runs a loaded program: crossbar layers through a weight provider, the rest digitally.

The chip and the compiler's reference executor share this interpreter and differ only in
where a layer's effective weights come from (programmed conductances vs. ideal targets),
so a mismatch between them points at the cells, not at the op implementations.
"""

from __future__ import annotations

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
    return (w * layer.scale).astype(np.float32)


def _matmul(ins: Instr, args: list[np.ndarray], weights: WeightProvider) -> np.ndarray:
    x, = args
    w = weights(ins.layer)
    if x.shape[-1] != w.shape[0]:
        raise ExecutionError(f"{ins.name}: input has {x.shape[-1]} features, layer expects {w.shape[0]}")
    return x @ w


_DIGITAL: dict[Opcode, Callable[[Instr, list[np.ndarray]], np.ndarray]] = {
    Opcode.ADD: lambda ins, a: a[0] + a[1],
    Opcode.RELU: lambda ins, a: np.maximum(a[0], np.float32(0)),
    Opcode.FLATTEN: lambda ins, a: a[0].reshape(int(np.prod(a[0].shape[:ins.attrs["axis"][0]])), -1),
}


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
        args = [env[t] for t in ins.inputs]
        try:
            if ins.op == Opcode.MATMUL:
                out = _matmul(ins, args, weights)
            else:
                out = _DIGITAL[ins.op](ins, args)
        except (ValueError, IndexError) as e:
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {e}") from None
        env[ins.outputs[0]] = out.astype(np.float32, copy=False)
    return [env[t] for t in program.outputs]
