"""A small valid program with every kind of field, a chip to load it on, and the chip state a
refused request must leave alone: what the bounds and program-fuzz tests share.

The model is written with onnx.helper (no torch export): a grouped Conv with bias, Relu,
MaxPool, Pad, Neg, Concat, Flatten, Gemm with bias, Clip, Softmax. Compiled for
arrays of 32x32 cells it has several tiles per layer, constants, and instructions with int,
ints and float attributes.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nvcim.compiler import Target, compile_model
from nvcim.firmware_emu.chip import Chip, ChipConfig, ChipError
from nvcim.firmware_emu.contract.program_format import CodeStruct, Program
from nvcim.firmware_emu.contract.protocol import Command, ErrorCode, ProgramLoadArgs, RunArgs

GEOMETRY = dict(arrays=16, rows=32, cols=32, weight_bits=8, cell_bits=2, buffer_size=1 << 16)
# what a refusal may change: the error it records
ERROR_REGISTERS = ("STATUS", "ERROR_CODE", "IRQ_FLAGS")


def small_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Pad", ["p", "pads"], ["q"], name="pad", mode="constant"),
        helper.make_node("Neg", ["q"], ["n"], name="neg"),
        helper.make_node("Concat", ["q", "n"], ["j"], name="concat", axis=1),
        helper.make_node("Flatten", ["j"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["g"], name="fc", transB=1),
        helper.make_node("Clip", ["g", "lo", "hi"], ["h"], name="clip"),
        helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=1),
    ]
    inits = [init("w", 4, 1, 3, 3), init("b", 4),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
             init("fc", 5, 200), init("fb", 5),
             numpy_helper.from_array(np.float32(-3), "lo"), numpy_helper.from_array(np.float32(3), "hi")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def small_program() -> Program:
    return compile_model(small_model(), Target(**GEOMETRY))


def new_chip() -> Chip:
    return Chip(ChipConfig(**GEOMETRY))


def load(chip: Chip, code: bytes) -> None:
    """Stage ``code`` and PROGRAM_LOAD it with its own CRC; raises ChipError if refused."""
    chip.buffer[:len(code)] = code
    chip.execute(Command.PROGRAM_LOAD, ProgramLoadArgs.build(dict(
        length=len(code), crc=zlib.crc32(code), weight_bits=GEOMETRY["weight_bits"],
        cell_bits=GEOMETRY["cell_bits"], array_rows=GEOMETRY["rows"], array_cols=GEOMETRY["cols"])))


def run(chip: Chip, batch: int = 3) -> bytes:
    """RUN the loaded program on seeded inputs; the reply (raises ChipError if refused)."""
    program = chip.program
    x = np.random.default_rng(1).standard_normal(
        (batch, sum(int(np.prod(program.tensors[t].shape[1:])) for t in program.inputs))).astype("<f4")
    chip.buffer[:x.nbytes] = x.tobytes()
    return chip.execute(Command.RUN, RunArgs.build(dict(batch=batch)))


def state(chip: Chip) -> tuple:
    """Everything a refused request must leave as it was: the loaded program, the cells, the
    registers but the error ones, the counters."""
    regs = {k: v for k, v in chip.registers.regs.items() if k not in ERROR_REGISTERS}
    return (chip.program_code, id(chip.program), chip.cells.g.tobytes(), chip.cells.target.tobytes(), regs,
            dict(chip.registers.counters))


def refused(chip: Chip, code: bytes) -> ChipError | None:
    """Load ``code``; the ChipError if refused (any other exception propagates), else None."""
    try:
        load(chip, code)
    except ChipError as e:
        return e
    return None


_CODE = CodeStruct.compile()


def parse(code: bytes):
    return _CODE.parse(code)


def build(container) -> bytes:
    return _CODE.build(container)


__all__ = ["ErrorCode", "GEOMETRY", "build", "load", "new_chip", "parse", "refused", "run", "small_model",
           "small_program", "state"]
