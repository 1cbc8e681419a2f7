"""A whole program as one ONNX graph, and that graph as one onnxruntime session.

Every opcode has an ONNX form (the ``graph`` column of ``ops.OPS``), so a program
translates back into a graph one instruction per node. The crossbar layers become MatMul
/ Conv nodes whose weights are the layers' effective weights, frozen into the graph as
initializers: onnxruntime then pre-packs them and fuses the digital ops around them, and
a small model runs several times faster than when an interpreter dispatches op by op.

Programs using a form one graph cannot express exactly (an average pool whose ceil_mode
padding is counted, negative pads, reductions over no axes) raise ``NoGraphForm``; an
interpreter runs them.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ops import OPS, NoGraphForm
from .program_format import Instr, Program

OPSET = 19  # Pad mode "wrap"; axes of every reduction as an input


def tensor_name(tid: int) -> str:
    """The graph's name of program tensor ``tid``."""
    return f"t{tid}"


class GraphBuilder:
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

    def model(self) -> onnx.ModelProto:
        p = self.program
        for ins in p.instructions:
            OPS[ins.op].graph(self, ins, [tensor_name(t) for t in ins.inputs], [tensor_name(t) for t in ins.outputs])
        for tid, value in p.constants.items():
            self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), tensor_name(tid)))
        inputs = [helper.make_tensor_value_info(tensor_name(t), TensorProto.FLOAT, ["N", *p.tensors[t].shape[1:]])
                  for t in p.inputs]
        outputs = []
        for i, tid in enumerate(p.outputs):  # every graph output a name of its own
            name = f"out{i}"
            self.nodes.append(helper.make_node("Identity", [tensor_name(tid)], [name], name=f"output{i}"))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        graph = helper.make_graph(self.nodes, "nvcim_program", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def program_model(program: Program, weights: list[np.ndarray]) -> onnx.ModelProto:
    """``program`` as one ONNX model with ``weights`` (one effective matrix per layer);
    raises NoGraphForm for a program no graph expresses exactly."""
    return GraphBuilder(program, weights).model()


def intra_op_threads() -> int:
    """onnxruntime's threads: OMP_NUM_THREADS where the process sets it (a Dask worker sets 1,
    so two workers on two cores do not each spin a pool as wide as the machine), else every
    core this process may use."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ProgramGraph:
    """A program with fixed layer weights, compiled into one onnxruntime session."""

    def __init__(self, program: Program, weights: list[np.ndarray]):
        import onnxruntime as ort  # deferred: a chip that never runs a program does not pay for it

        model = program_model(program, weights)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = intra_op_threads()
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime refuses a form the checker accepted
            raise NoGraphForm(f"onnxruntime refused the program's graph: {e}") from None
        self._inputs = [tensor_name(t) for t in program.inputs]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self._inputs, feeds)))
