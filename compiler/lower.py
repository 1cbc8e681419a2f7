"""Lowering ONNX nodes to chip instructions.

Weight layers (Gemm, MatMul with a constant weight) become crossbar MATMULs; all other
ops run on the chip's digital unit. Each handler takes the node and emits instructions
into the Lowering, which tracks tensor ids, shapes and the weight layers met so far.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from firmware_emu.program_format import Instr, Opcode, TensorDecl

from .frontend import CompileError


class Lowering:
    def __init__(self, source: str, consts: dict[str, np.ndarray], shared: str):
        self.source = source
        self.consts = consts
        self.shared = shared
        self.tensors: list[TensorDecl] = []
        self.ids: dict[str, int] = {}
        self.constants: dict[int, np.ndarray] = {}
        self.instructions: list[Instr] = []
        self.weights: dict[str, np.ndarray] = {}        # layer name -> (in, out) float matrix
        self.weight_sources: dict[str, str] = {}        # layer name -> initializer name
        self.node: onnx.NodeProto | None = None
        self.label = ""

    # -- helpers for handlers -------------------------------------------------------
    def error(self, message: str) -> CompileError:
        return CompileError(f"{self.source}: node '{self.label}' ({self.node.op_type}): {message}")

    def tensor(self, name: str, shape: tuple[int, ...]) -> int:
        self.ids[name] = len(self.tensors)
        self.tensors.append(TensorDecl(name, tuple(shape)))
        return self.ids[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[self.ids_for(name)].shape

    def ids_for(self, name: str) -> int:
        """Tensor id of ``name``, declaring it as a chip constant if it is an initializer."""
        if name not in self.ids:
            if name not in self.consts:
                raise self.error(f"input '{name}' is neither produced by an earlier node nor a constant")
            value = np.asarray(self.consts[name], dtype=np.float32)
            tid = self.tensor(name, value.shape)
            self.constants[tid] = value
        return self.ids[name]

    def const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise self.error(f"{what} '{name}' must be a constant (initializer) to be placed on the crossbars")
        return self.consts[name]

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def emit(self, op: Opcode, inputs: list[str], output: str, shape: tuple[int, ...], layer: int = -1,
             attrs: dict | None = None) -> None:
        ins = [self.ids_for(n) for n in inputs]
        out = self.tensor(output, shape)
        self.instructions.append(Instr(op, self.label, ins, [out], layer, attrs or {}))

    def matmul(self, x: str, w: np.ndarray, source: str, output: str) -> None:
        """Emit a crossbar MATMUL of x by the constant matrix w (in_features x out_features)."""
        key = source if self.shared == "common" else f"{source}@{self.label}"
        known = self.weights.get(key)
        if known is not None and (known.shape != w.shape or not np.array_equal(known, w)):
            raise self.error(f"weight '{source}' is shared but used here in a different form; "
                             f"compile with shared='separate'")
        self.weights.setdefault(key, w)
        self.weight_sources[key] = source
        layer = list(self.weights).index(key)
        x_shape = self.shape(x)
        if x_shape[-1] != w.shape[0]:
            raise self.error(f"input '{x}' has {x_shape[-1]} features, weight '{source}' expects {w.shape[0]}")
        self.emit(Opcode.MATMUL, [x], output, (*x_shape[:-1], w.shape[1]), layer=layer)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy broadcasting of two static shapes where -1 marks the batch dimension."""
    n = max(len(a), len(b))
    a2, b2 = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a2, b2):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
    return tuple(out)


# -- op handlers --------------------------------------------------------------------
def _gemm(lo: Lowering, node: onnx.NodeProto) -> None:
    if lo.attr("transA", 0):
        raise lo.error("transA=1 is not supported (the activation must be the left operand as is)")
    a, b = node.input[0], node.input[1]
    w = np.asarray(lo.const(b, "weight"), dtype=np.float64)
    if w.ndim != 2:
        raise lo.error(f"weight '{b}' has rank {w.ndim}, expected 2")
    if lo.attr("transB", 0):
        w = w.T
    w = w * lo.attr("alpha", 1.0)
    out = node.output[0]
    has_bias = len(node.input) > 2 and node.input[2]
    lo.matmul(a, w, b, out + "/matmul" if has_bias else out)
    if has_bias:
        bias_name = node.input[2]
        bias = np.asarray(lo.const(bias_name, "bias"), dtype=np.float32) * np.float32(lo.attr("beta", 1.0))
        tid = lo.tensor(f"{out}/bias", bias.shape)
        lo.constants[tid] = bias
        _emit_add(lo, out + "/matmul", f"{out}/bias", out)


def _matmul(lo: Lowering, node: onnx.NodeProto) -> None:
    x, w_name = node.input
    if x in lo.consts and w_name not in lo.consts:
        raise lo.error("a constant left operand is not supported; the weight must be the right operand")
    w = np.asarray(lo.const(w_name, "weight"), dtype=np.float64)
    if w.ndim != 2:
        raise lo.error(f"weight '{w_name}' has rank {w.ndim}, expected 2")
    lo.matmul(x, w, w_name, node.output[0])


def _emit_add(lo: Lowering, a: str, b: str, out: str) -> None:
    try:
        shape = _broadcast(lo.shape(a), lo.shape(b))
    except ValueError as e:
        raise lo.error(str(e)) from None
    lo.emit(Opcode.ADD, [a, b], out, shape)


def _add(lo: Lowering, node: onnx.NodeProto) -> None:
    _emit_add(lo, node.input[0], node.input[1], node.output[0])


def _relu(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    lo.emit(Opcode.RELU, [x], node.output[0], lo.shape(x))


def _flatten(lo: Lowering, node: onnx.NodeProto) -> None:
    x = node.input[0]
    shape = lo.shape(x)
    axis = lo.attr("axis", 1)
    if axis not in (1, 1 - len(shape)):
        raise lo.error(f"axis={axis} would mix the batch dimension into the features; only axis=1 is supported")
    lo.emit(Opcode.FLATTEN, [x], node.output[0], (-1, int(np.prod(shape[1:]))), attrs={"axis": [1]})


HANDLERS: dict[str, Callable[[Lowering, onnx.NodeProto], None]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "Relu": _relu,
    "Flatten": _flatten,
}
