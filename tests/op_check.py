"""Op checks shared by the op tests: a hand-built ONNX graph, compiled and run with ideal
cells as the chip's onnxruntime graph, by its interpreter and by the op table's reference
kernels, each compared with onnxruntime on ``quantized_model`` (1e-5 of the largest output:
float32 summation order only)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nvcim.compiler import compile_model, quantized_model, reference
from nvcim.firmware_emu import executor, graph_engine
from nvcim.firmware_emu.contract import interpreter


def build(nodes, inputs: dict[str, tuple], outputs: list[str], inits: dict[str, np.ndarray] | None = None,
          opset: int = 17, types: dict[str, int] | None = None) -> onnx.ModelProto:
    """A model whose inputs have batch 'N' first (float32 unless ``types`` says otherwise)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(k, (types or {}).get(k, TensorProto.FLOAT), ["N", *v])
                     for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # IR 4 at least: the outputs' shapes are left to inference, which IR 3 does not allow
    model.ir_version = max(helper.find_min_ir_version_for(list(model.opset_import)), 4)
    return onnx.shape_inference.infer_shapes(model)


def check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], graph: bool = True,
          want: list[np.ndarray] | None = None):
    """Compile; run as the chip's graph (``graph``: whether it has one), its interpreter and
    the reference kernels; compare each with ``want``, by default onnxruntime on the
    quantised model."""
    program = compile_model(model)
    weights = [reference.ideal_weights(program, i) for i in range(len(program.layers))]
    ordered = [feeds[program.tensors[t].name].astype(np.float32) for t in program.inputs]
    built = graph_engine.graph_for(program, weights.__getitem__)
    assert (built is not None) == graph
    runs = {"interpreter": executor.run(program, ordered, weights.__getitem__, engine=False),
            "reference kernels": interpreter.run(program, ordered, weights.__getitem__)}
    if built is not None:
        runs["graph"] = built.run(ordered)
    if want is None:
        want = ort.InferenceSession(quantized_model(model).SerializeToString()).run(None, feeds)
    for how, got in runs.items():
        assert len(got) == len(want), how
        for tid, g, w in zip(program.outputs, got, want):
            assert g.shape == w.shape, how
            assert program.tensors[tid].shape == (-1, *w.shape[1:]), "declared shape"
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())), err_msg=how)
    return program
