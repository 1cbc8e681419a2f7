"""RUN and INFER (and a CONTROL.START run): the loaded program on a batch of inputs.

A run is checked first (program, batch, sizes), then runs the executor on batch slices of
``RUN_SLICE`` samples, each slice one chunk of the operation, and writes the outputs over
the inputs only after the last slice: a refused, failed or aborted run leaves the staging
buffer as it was.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

from . import executor
from .commands import loaded
from .contract.program_format import Program
from .contract.protocol import MAX_PAYLOAD, Command, ErrorCode, RunArgs, build_output_shapes
from .contract.registers import LIMITS
from .errors import ChipError, parse_args, parse_header
from .operations import Abort, Operation, Steps, primed

if TYPE_CHECKING:
    from .chip import Chip

RUN_SLICE = 256  # samples per batch slice: an abort takes effect, and a host's frame is served, between two


def run(chip: Chip, payload: bytes) -> Operation:
    return start_run(chip, parse_args("RUN", RunArgs, payload).batch)


def infer(chip: Chip, payload: bytes) -> Operation:
    """RUN on inputs carried in the request, replying with the outputs: one frame each way
    instead of BUF_WRITE, RUN and BUF_READ, for batches whose data fits a frame."""
    header, data = parse_header("INFER", RunArgs, payload)
    batch = header.batch
    program = loaded(chip, "INFER")
    inputs = _sample_bytes(program, program.inputs) * batch
    if len(data) != inputs:
        raise ChipError(ErrorCode.BAD_LENGTH, f"INFER: batch {batch} takes {inputs} bytes of inputs after the "
                        f"u32 batch, got {len(data)}")
    shapes = 1 + sum(1 + 4 * len(program.tensors[t].shape) for t in program.outputs)  # count, ndim, dims
    outputs = _sample_bytes(program, program.outputs) * batch
    if shapes + outputs > MAX_PAYLOAD:
        raise ChipError(ErrorCode.FRAME_TOO_LARGE, f"INFER: the reply for batch {batch} ({shapes} bytes of shapes, "
                        f"{outputs} of outputs) would exceed the {MAX_PAYLOAD}-byte frame limit; use BUF_WRITE, "
                        f"RUN and BUF_READ")
    return start_run(chip, batch, "INFER", data)


def _sample_bytes(program: Program, tensors: list[int]) -> int:
    """Bytes of one sample of ``tensors`` (f32, batch dimension excluded)."""
    return sum(4 * math.prod(program.tensors[t].shape[1:]) for t in tensors)


def start_run(chip: Chip, batch: int, name: str = "RUN", inline: memoryview | None = None) -> Operation:
    """Check a run of the loaded program on ``batch`` inputs; its steps run it.

    The inputs are staged in the buffer, or ``inline`` (INFER's request, whose reply then
    carries the outputs after their shapes). Sizes are checked before anything is read
    or written, so a refused run leaves the buffer as it was.
    """
    program = loaded(chip, name)
    if not 0 < batch <= LIMITS["RUN_BATCH"]:
        raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name}: batch size {batch} outside 1..{LIMITS['RUN_BATCH']}")
    shapes = [(batch, *program.tensors[tid].shape[1:]) for tid in program.inputs]
    sizes = [4 * math.prod(shape) for shape in shapes]
    if sum(sizes) > len(chip.buffer):
        raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {sum(sizes)} bytes of inputs for batch {batch} exceed "
                        f"the {len(chip.buffer)}-byte staging buffer")
    source = chip.buffer if inline is None else inline
    offsets = itertools.accumulate(sizes[:-1], initial=0)
    feeds = [np.frombuffer(source, dtype="<f4", count=n // 4, offset=o).reshape(shape)
             for shape, n, o in zip(shapes, sizes, offsets)]
    command = Command.RUN if inline is None else Command.INFER
    return Operation(command, batch, primed(_run_steps(chip, name, program, batch, feeds, inline is not None)))


def _run_steps(chip: Chip, name: str, program: Program, batch: int, feeds: list[np.ndarray],
               inline: bool = False) -> Steps:
    """Run the program on batch slices of RUN_SLICE samples, then write all outputs at once.

    The outputs go over the inputs, so none is written before the last slice has run:
    an aborted or failed run leaves the buffer as it was. A batch up to RUN_SLICE is one
    slice, exactly one executor run.
    """
    registers, weights = chip.registers, chip.weights
    product, read_noise = chip.run_products()
    per_sample = sum(1 for i in program.instructions if i.layer >= 0)
    parts: list[list[np.ndarray]] = []
    done = 0
    try:
        yield 0
        for a in range(0, batch, RUN_SLICE):
            b = min(batch, a + RUN_SLICE)
            try:
                outs = executor.run(program, [f[a:b] for f in feeds], weights.layer, product, read_noise=read_noise)
            except executor.ExecutionError as e:
                raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name}: {e}") from None
            if b - a < batch:
                for tid, out in zip(program.outputs, outs):
                    if out.ndim == 0 or out.shape[0] != b - a:
                        raise ChipError(ErrorCode.BAD_ARGUMENT, (
                            f"{name}: output '{program.tensors[tid].name}' has shape {out.shape} for a slice of "
                            f"{b - a} samples: its dim 0 is not the batch, so a batch over {RUN_SLICE} "
                            f"cannot run in slices"))
            parts.append(outs)
            done = b
            if done < batch:
                yield done
    except Abort:
        registers.counters["mvm_ops"] += done * per_sample
        raise ChipError(ErrorCode.ABORTED, f"{name} aborted after {done} of {batch} samples ({-(-done // RUN_SLICE)} "
                        f"slices of {RUN_SLICE}); no output written, buffer unchanged") from None
    outputs = parts[0] if len(parts) == 1 else [np.concatenate(group) for group in zip(*parts)]
    data = b"".join(np.ascontiguousarray(out, dtype="<f4").tobytes() for out in outputs)
    if len(data) > len(chip.buffer):
        raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {len(data)} bytes of outputs for batch {batch} exceed "
                        f"the {len(chip.buffer)}-byte staging buffer")
    chip.buffer[:len(data)] = data
    registers.counters["mvm_ops"] += batch * per_sample
    registers.done()
    return build_output_shapes([o.shape for o in outputs]) + (data if inline else b"")
