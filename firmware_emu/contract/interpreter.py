"""The reference interpreter: a program run instruction by instruction with the op table's kernels.

This is the definition of what a program computes; it is written for clarity, not speed
(the emulator's executor adds in-place ops, torch products and converters on top of the
same kernels).
"""

from __future__ import annotations

import numpy as np

from .ops import ExecutionError, WeightProvider, execute
from .program_format import Instr, Program


def bind_inputs(program: Program, feeds: list[np.ndarray]) -> dict[int, np.ndarray]:
    """The program's constants and its inputs by tensor id, every input checked against
    its declared shape (any batch size)."""
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
    return env


def store_results(ins: Instr, outs: list[np.ndarray], env: dict[int, np.ndarray]) -> None:
    """Put one instruction's results into ``env`` as float32, checking it made one per output."""
    if len(outs) != len(ins.outputs):
        raise ExecutionError(f"{ins.op.name} '{ins.name}': {len(outs)} results for {len(ins.outputs)} outputs")
    for tid, out in zip(ins.outputs, outs):
        env[tid] = out.astype(np.float32, copy=False)


def run(program: Program, feeds: list[np.ndarray], weights: WeightProvider) -> list[np.ndarray]:
    """Execute ``program`` on ``feeds`` (one array per program input, batch first)."""
    env = bind_inputs(program, feeds)
    for ins in program.instructions:
        try:
            outs = execute(ins, [env[t] for t in ins.inputs], weights)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            raise ExecutionError(f"{ins.op.name} '{ins.name}': {e}") from None
        store_results(ins, outs, env)
    return [env[t] for t in program.outputs]
