"""A whole program as one onnxruntime graph: the chip's fast way to run it.

Every opcode is an ONNX operator under another name, so a program translates back into a
graph one instruction per node. The crossbar layers become MatMul / Conv nodes whose
weights are the layers' effective weights (what the programmed conductances encode),
frozen into the graph as initializers: onnxruntime then pre-packs them and fuses the
digital ops around them, and a small model runs several times faster than when the
interpreter dispatches op by op. The graph is built again whenever a layer's effective
weights change (new cells), which costs milliseconds to a second, once per programming.

Programs using a form the graph cannot express exactly (an average pool whose ceil_mode
padding is counted, negative pads, reductions over no axes) are declined; the
interpreter in ``executor`` runs them, as it runs every product through finite
converters. ``executor.run`` decides; see its ``engine`` argument.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .contract.program_format import Instr, Opcode, Program

log = logging.getLogger(__name__)

OPSET = 19  # Pad mode "wrap"; axes of every reduction as an input
INT64_MIN = np.iinfo(np.int64).min

_SAME_NAME = {  # opcode -> ONNX operator taking the same inputs and no attributes
    Opcode.ADD: "Add", Opcode.SUB: "Sub", Opcode.MUL: "Mul", Opcode.DIV: "Div", Opcode.PRELU: "PRelu",
    Opcode.RELU: "Relu", Opcode.SIGMOID: "Sigmoid", Opcode.TANH: "Tanh", Opcode.SOFTPLUS: "Softplus",
    Opcode.SOFTSIGN: "Softsign", Opcode.EXP: "Exp", Opcode.NEG: "Neg", Opcode.ABS: "Abs",
    Opcode.GLOBAL_AVGPOOL: "GlobalAveragePool", Opcode.GLOBAL_MAXPOOL: "GlobalMaxPool",
}
_REDUCE = {Opcode.REDUCE_MEAN: "ReduceMean", Opcode.REDUCE_SUM: "ReduceSum", Opcode.REDUCE_MAX: "ReduceMax"}
_PAD_MODES = {0: "constant", 1: "reflect", 2: "edge", 3: "wrap"}


class Unsupported(ValueError):
    """The program uses a form this engine does not express exactly; the interpreter runs it."""


class _Builder:
    """Collects the nodes and initializers of the graph of one program."""

    def __init__(self, program: Program, weights: list[np.ndarray]):
        self.program = program
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, hint: str, value: np.ndarray) -> str:
        name = f"c{len(self.initializers)}_{hint}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], ins: Instr, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"n{len(self.nodes)}_{ins.name}", **attrs))

    def add(self, ins: Instr) -> None:
        x = [_tensor(t) for t in ins.inputs]
        y = [_tensor(t) for t in ins.outputs]
        a, op = ins.attrs, ins.op
        if op in _SAME_NAME:
            self.node(_SAME_NAME[op], x, y, ins)
        elif op == Opcode.MATMUL:
            self.node("MatMul", [x[0], self.const("w", self.weights[ins.layer])], y, ins)
        elif op == Opcode.CONV:
            self.node("Conv", [x[0], self.const("w", self._kernel(ins))], y, ins, kernel_shape=a["kernel"],
                      strides=a["strides"], pads=a["pads"], dilations=a["dilations"], group=a["group"][0])
        elif op in (Opcode.LEAKY_RELU, Opcode.ELU):
            self.node("LeakyRelu" if op == Opcode.LEAKY_RELU else "Elu", x, y, ins, alpha=float(a["alpha"][0]))
        elif op == Opcode.SELU:
            self.node("Selu", x, y, ins, alpha=float(a["alpha"][0]), gamma=float(a["gamma"][0]))
        elif op == Opcode.CLIP:
            self.node("Clip", [x[0], self.const("min", np.float32(a["min"][0])),
                               self.const("max", np.float32(a["max"][0]))], y, ins)
        elif op == Opcode.MAXPOOL:
            self.node("MaxPool", x, y, ins, kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"],
                      dilations=a["dilations"])
        elif op == Opcode.AVGPOOL:
            counted = a["count_include_pad"][0]
            if counted and any(a["ceil_pads"]) or any(d != 1 for d in a["dilations"]):
                raise Unsupported(f"AVGPOOL '{ins.name}': counted ceil_mode padding or dilation")
            self.node("AveragePool", x, y, ins, kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"],
                      count_include_pad=counted)
        elif op in (Opcode.SOFTMAX, Opcode.LOG_SOFTMAX):
            self.node("Softmax" if op == Opcode.SOFTMAX else "LogSoftmax", x, y, ins, axis=a["axis"][0])
        elif op in _REDUCE:
            if not a["axes"]:
                raise Unsupported(f"{op.name} '{ins.name}' over no axes")
            self.node(_REDUCE[op], [x[0], self.const("axes", np.array(a["axes"], np.int64))], y, ins,
                      keepdims=a["keepdims"][0])
        elif op == Opcode.RESHAPE:  # 0 keeps the input's dimension: the batch
            self.node("Reshape", [x[0], self.const("shape", np.array([0, *a["shape"][1:]], np.int64))], y, ins)
        elif op == Opcode.TRANSPOSE:
            self.node("Transpose", x, y, ins, perm=a["perm"])
        elif op == Opcode.CONCAT:
            self.node("Concat", x, y, ins, axis=a["axis"][0])
        elif op == Opcode.SPLIT:
            self.node("Split", [x[0], self.const("sizes", np.array(a["sizes"], np.int64))], y, ins,
                      axis=a["axis"][0])
        elif op == Opcode.SLICE:
            starts, counts, steps = a["starts"], a["counts"], a["steps"]
            ends = [s + c * st if s + c * st >= 0 else INT64_MIN for s, c, st in zip(starts, counts, steps)]
            self.node("Slice", [x[0], self.const("starts", np.array(starts, np.int64)),
                                self.const("ends", np.array(ends, np.int64)),
                                self.const("axes", np.arange(1, len(starts) + 1, dtype=np.int64)),
                                self.const("steps", np.array(steps, np.int64))], y, ins)
        elif op == Opcode.PAD:
            if any(p < 0 for p in a["pads"]):
                raise Unsupported(f"PAD '{ins.name}' with negative pads")
            self.node("Pad", [x[0], self.const("pads", np.array(a["pads"], np.int64)),
                              self.const("value", np.float32(a["value"][0]))], y, ins,
                      mode=_PAD_MODES[a["mode"][0]])
        else:
            raise Unsupported(f"opcode {op.name} has no graph form")

    def _kernel(self, ins: Instr) -> np.ndarray:
        """The group matrices (Cg*K, Cog), rows in (channel, kernel offset) order, as one
        ONNX kernel (C_out, Cg, *kernel)."""
        kernel, group = ins.attrs["kernel"], ins.attrs["group"][0]
        matrices = [self.weights[ins.layer + g] for g in range(group)]
        rows = matrices[0].shape[0] // int(np.prod(kernel))
        return np.ascontiguousarray(np.stack(matrices).transpose(0, 2, 1)).reshape(-1, rows, *kernel)

    def model(self) -> onnx.ModelProto:
        p = self.program
        for ins in p.instructions:
            self.add(ins)
        for tid, value in p.constants.items():
            self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), _tensor(tid)))
        inputs = [helper.make_tensor_value_info(_tensor(t), TensorProto.FLOAT, ["N", *p.tensors[t].shape[1:]])
                  for t in p.inputs]
        outputs = []
        for i, tid in enumerate(p.outputs):  # every graph output a name of its own
            name = f"out{i}"
            self.nodes.append(helper.make_node("Identity", [_tensor(tid)], [name], name=f"output{i}"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        graph = helper.make_graph(self.nodes, "nvcim_program", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def _tensor(tid: int) -> str:
    return f"t{tid}"


class Graph:
    """A program with fixed layer weights, compiled into one onnxruntime session."""

    def __init__(self, program: Program, weights: list[np.ndarray]):
        import onnxruntime as ort  # deferred: a chip that never runs a program does not pay for it

        model = _Builder(program, weights).model()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = os.cpu_count() or 1
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime refuses a form the checker accepted
            raise Unsupported(f"onnxruntime refused the program's graph: {e}") from None
        self._inputs = [_tensor(t) for t in program.inputs]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self._inputs, feeds)))


# (program id, weight array ids) -> (weak references to them, graph or None). No lock: the
# dict's own operations are atomic, and a finalizer (which may run inside any allocation,
# on any thread) must never wait for one. Two threads may build the same graph; one wins.
_graphs: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], Graph | None]] = {}


def graph_for(program: Program, weights: Callable[[int], np.ndarray]) -> Graph | None:
    """The graph of ``program`` with the layer weights the provider gives now, or None if
    the program cannot be expressed as a graph (or its graph failed to run).

    Cached while the program and the weight arrays live: a chip keeps one array per layer
    per cell generation, so inference after inference reuses one session, and programming
    new cells (new arrays) builds a new one.
    """
    arrays = [weights(i) for i in range(len(program.layers))]
    key = _key(program, arrays)
    hit = _graphs.get(key)
    if hit is not None and all(ref() is obj for ref, obj in zip(hit[0], (program, *arrays))):
        return hit[1]
    for stale in [k for k, (refs, _) in list(_graphs.items()) if any(ref() is None for ref in refs)]:
        _graphs.pop(stale, None)  # ids of dead objects may come back on new ones
    try:
        graph: Graph | None = Graph(program, arrays)
    except Unsupported as e:
        log.debug("program runs on the interpreter: %s", e)
        graph = None
    _graphs[key] = (tuple(weakref.ref(obj) for obj in (program, *arrays)), graph)
    # freed with the first weight array (a new cell generation), or the program if it has none
    weakref.finalize(arrays[0] if arrays else program, _graphs.pop, key, None)
    return graph


def decline(program: Program, weights: Callable[[int], np.ndarray], reason: Exception) -> None:
    """Record that the graph of ``program`` with these weights failed to run: it is not
    tried again, and the interpreter runs the program from now on."""
    key = _key(program, [weights(i) for i in range(len(program.layers))])
    hit = _graphs.get(key)
    if hit is not None and hit[1] is not None:
        log.warning("the program's onnxruntime graph failed (%s: %s); the interpreter runs it",
                    type(reason).__name__, reason)
        _graphs[key] = (hit[0], None)


def _key(program: Program, arrays: list[np.ndarray]) -> tuple[int, ...]:
    return (id(program), *map(id, arrays))
