"""The ops classic ImageNet-era exports use beyond the basics: LRN, Dropout declaring its
mask, ConvTranspose (zero insertion and a CONV of the flipped kernel), Gather of a constant
table by integer indices (ONE_HOT and a crossbar MATMUL). Each is compiled at several
opsets and run with ideal cells as the chip's onnxruntime graph, by its interpreter and by
the op table's reference kernels, against onnxruntime on ``quantized_model`` (1e-5 of the
largest output: float32 summation order only)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nvcim.compiler import CompileError, compile_model, quantized_model
from nvcim.firmware_emu.contract.program_format import Opcode

from op_check import build, check

RNG = np.random.default_rng(14)
OPSETS = [7, 11, 13, 17]


def lrn_by_the_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """ONNX's LRN formula channel by channel (onnxruntime takes odd sizes only, and onnx's
    reference evaluator sums over the wrong axis)."""
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        window = x[:, max(0, c - (size - 1) // 2):c + size // 2 + 1].astype(np.float64)
        out[:, c] = x[:, c] / (bias + alpha / size * (window ** 2).sum(axis=1)) ** beta
    return out


def x(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("size", [1, 4, 5])
def test_lrn(opset, size):
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=0.02, beta=0.6, bias=1.5)
    feed = 3 * x(2, 6, 3, 4)
    # onnxruntime takes odd sizes only: an even one runs on the interpreter
    odd = size % 2 == 1
    program = check(build([node], {"x": (6, 3, 4)}, ["y"], opset=opset), {"x": feed}, graph=odd,
                    want=None if odd else [lrn_by_the_spec(feed, size, 0.02, 0.6, 1.5)])
    assert [i.op for i in program.instructions] == [Opcode.LRN]


def test_lrn_defaults_after_a_conv():
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("LRN", ["c"], ["y"], size=3)]
    check(build(nodes, {"x": (2, 5, 5)}, ["y"], {"W": x(7, 2, 1, 1)}, opset=9), {"x": x(3, 2, 5, 5)})


@pytest.mark.parametrize("opset", OPSETS)
def test_dropout_mask_output_unused_is_dropped(opset):
    inits = {} if opset < 12 else {"r": np.float32(0.4)}
    nodes = [helper.make_node("Dropout", ["x", "r"] if inits else ["x"], ["d", "mask"],
                              **({"ratio": 0.4} if not inits else {})),
             helper.make_node("Relu", ["d"], ["y"])]
    program = check(build(nodes, {"x": (5,)}, ["y"], inits, opset=opset), {"x": x(4, 5)})
    assert [i.op for i in program.instructions] == [Opcode.RELU]


def test_dropout_mask_that_is_used_is_refused():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop")]
    model = build(nodes, {"x": (5,)}, ["y"], opset=13)
    model.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 5]))
    with pytest.raises(CompileError, match="node 'drop' \\(Dropout\\): the mask output 'mask' is used"):
        compile_model(model, source="m.onnx")


TRANSPOSED = {  # name -> (input shape, weight shape, attributes)
    "stride2_pads_output_padding": ((3, 7, 6), (3, 4, 3, 3), dict(strides=[3, 2], pads=[1, 1, 1, 1],
                                                                  output_padding=[1, 1])),
    "plain": ((2, 4, 5), (2, 3, 2, 3), {}),
    "pads_beyond_kernel_reach": ((2, 6, 6), (2, 2, 2, 2), dict(strides=[2, 2], pads=[2, 1, 2, 2])),
    "dilated_grouped": ((4, 4, 5), (4, 3, 3, 2), dict(group=2, dilations=[2, 1], strides=[1, 2])),
    "depthwise": ((3, 5, 5), (3, 1, 3, 3), dict(group=3, strides=[2, 2], pads=[1, 1, 1, 1])),
    "same_upper": ((2, 5, 4), (2, 3, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same_lower": ((2, 5, 4), (2, 3, 3, 4), dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    "output_shape": ((2, 4, 4), (2, 3, 3, 3), dict(output_shape=[8, 10], strides=[2, 2])),
    "1d": ((3, 6), (3, 2, 4), dict(strides=[3], pads=[2, 1])),
    "3d": ((2, 3, 3, 2), (2, 2, 2, 2, 3), dict(strides=[2, 1, 2], pads=[0, 1, 0, 1, 0, 1])),
}


@pytest.mark.parametrize("name", TRANSPOSED)
def test_conv_transpose(name):
    shape, wshape, attrs = TRANSPOSED[name]
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], **attrs)
    program = check(build([node], {"x": shape}, ["y"], {"W": x(*wshape), "B": x(wshape[1] * attrs.get("group", 1))}),
                    {"x": x(3, *shape)})
    group = attrs.get("group", 1)
    assert [i.op for i in program.instructions if i.layer >= 0] == [Opcode.CONV]
    assert len(program.layers) == group
    assert (program.layers[0].in_features, program.layers[0].out_features) == \
        (wshape[0] // group * int(np.prod(wshape[2:])), wshape[1])


@pytest.mark.parametrize("opset", OPSETS)
def test_conv_transpose_at_opsets(opset):
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2], pads=[0, 1, 1, 0],
                            output_padding=[1, 0])
    check(build([node], {"x": (3, 4, 5)}, ["y"], {"W": x(3, 2, 3, 3)}, opset=opset), {"x": x(2, 3, 4, 5)})


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("itype", [TensorProto.INT64, TensorProto.INT32])
def test_gather_embedding(opset, itype):
    """Indices in and out of order, repeated, negative (from the end)."""
    nodes = [helper.make_node("Gather", ["table", "idx"], ["e"]), helper.make_node("Relu", ["e"], ["y"])]
    model = build(nodes, {"idx": (5,)}, ["y"], {"table": x(11, 6)}, opset=opset, types={"idx": itype})
    dtype = np.int64 if itype == TensorProto.INT64 else np.int32
    idx = np.array([[0, 10, 3, 3, -1], [-11, 2, 9, 0, 5]], dtype)
    program = check(model, {"idx": idx})
    assert [i.op for i in program.instructions] == [Opcode.ONE_HOT, Opcode.MATMUL, Opcode.RELU]
    assert (program.layers[0].in_features, program.layers[0].out_features) == (11, 6)


def test_gather_from_a_table_of_rank_3():
    node = helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)
    model = build([node], {"idx": (2, 3)}, ["y"], {"table": x(7, 2, 4)}, types={"idx": TensorProto.INT64})
    check(model, {"idx": RNG.integers(-7, 7, (4, 2, 3))})


GATHER_REFUSED = {
    "activation data": ([helper.make_node("Gather", ["x", "i"], ["y"], name="g")], {"i": np.array([0], np.int64)},
                        "node 'g' \\(Gather\\): data 'x' is computed on the chip"),
    "axis 1": ([helper.make_node("Gather", ["t", "x"], ["y"], axis=1, name="g")], {"t": x(3, 4)},
               "input 'x' is FLOAT"),
}


def test_gather_other_than_rows_of_a_constant_table_is_refused():
    with pytest.raises(CompileError, match="node 'g' \\(Gather\\): data 'x' is computed on the chip"):
        compile_model(build([helper.make_node("Gather", ["x", "i"], ["y"], name="g")], {"x": (4,)}, ["y"],
                            {"i": np.array([0], np.int64)}), source="m.onnx")
    model = build([helper.make_node("Gather", ["t", "i"], ["y"], axis=1, name="g")], {"i": (2,)}, ["y"],
                  {"t": x(3, 4)}, types={"i": TensorProto.INT64})
    with pytest.raises(CompileError, match="node 'g' \\(Gather\\): axis=1: only rows"):
        compile_model(model, source="m.onnx")


def test_integer_input_used_as_anything_but_indices_is_refused():
    nodes = [helper.make_node("Gather", ["t", "i"], ["e"]), helper.make_node("Cast", ["i"], ["f"], to=1),
             helper.make_node("Add", ["f", "f"], ["y"])]
    model = build(nodes, {"i": (2,)}, ["y", "e"], {"t": x(3, 4)}, types={"i": TensorProto.INT64})
    with pytest.raises(CompileError, match="input 'i' is INT64; the chip takes float32 inputs \\(integer inputs "
                                           "only as the indices of a Gather"):
        compile_model(model, source="m.onnx")


def test_embedding_session_takes_integer_indices_and_refuses_out_of_range_ones(tmp_path):
    from nvcim import driver

    nodes = [helper.make_node("Gather", ["table", "idx"], ["y"])]
    table = x(9, 4)
    path = tmp_path / "embedding.onnx"
    onnx.save(build(nodes, {"idx": (3,)}, ["y"], {"table": table}, types={"idx": TensorProto.INT64}), path)
    idx = np.array([[0, 8, -9], [4, 4, -1]], np.int64)
    with driver.load(path, device="emu://?sigma=0") as sess:
        assert [i.type for i in sess.get_inputs()] == ["tensor(int64)"]
        got, = sess.run(None, {"idx": idx})
        want, = ort.InferenceSession(quantized_model(onnx.load(path)).SerializeToString()).run(None, {"idx": idx})
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
        with pytest.raises(driver.InvalidArgument, match="input 'idx' holds index 9 at \\(1, 2\\), outside "
                                                         "\\[-9, 9\\) \\(the table has 9 rows\\)"):
            sess.run(None, {"idx": np.array([[0, 1, 2], [3, 4, 9]], np.int64)})
        with pytest.raises(driver.InvalidArgument, match="actual float32, expected int64"):
            sess.run(None, {"idx": idx.astype(np.float32)})


# -- graph inputs whose dim 0 is no batch ------------------------------------------------
def _fixed(nodes, inputs: dict[str, tuple], outputs: list[str], inits: dict | None = None) -> onnx.ModelProto:
    """Inputs of the given shapes exactly ('N' where a shape says so)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v)
                                           for k, v in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def _session_matches_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path) -> None:
    from nvcim import driver

    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    want = ort.InferenceSession(quantized_model(model).SerializeToString()).run(None, feeds)
    with driver.load(path, device="emu://?sigma=0") as sess:
        got = sess.run(None, feeds)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())))


def test_fixed_shape_model_whose_dim_0_is_data(tmp_path):
    """A (10, 10) input meeting a (10, 10) constant: dim 0 cannot be a batch, so the chip
    holds the whole input as one sample (the PoissonNLLLoss export's form)."""
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Mul", ["t", "x"], ["m"]),
             helper.make_node("Sub", ["e", "m"], ["y"])]
    model = _fixed(nodes, {"x": [10, 10]}, ["y"], {"t": x(10, 10)})
    program = compile_model(model)
    assert program.tensors[program.inputs[0]].shape == (-1, 10, 10)
    _session_matches_onnxruntime(model, {"x": x(10, 10)}, tmp_path)


def test_fixed_shape_inputs_beside_a_batched_one_are_no_batch(tmp_path):
    """x has the batch 'N'; b (4,) and c (3, 1) have none: broadcast as ONNX does, and an
    output computed from b alone comes back with b's shape."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Mul", ["s", "c"], ["p"]),
             helper.make_node("MatMul", ["p", "W"], ["y"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Sum", ["x", "c", "b"], ["z"])]
    model = _fixed(nodes, {"x": ["N", 3, 4], "b": [4], "c": [3, 1]}, ["y", "rb", "z"], {"W": x(4, 5)})
    _session_matches_onnxruntime(model, {"x": x(6, 3, 4), "b": x(4), "c": x(3, 1)}, tmp_path)


def test_an_input_without_batch_into_a_non_elementwise_op_is_refused():
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Softmax", ["b"], ["y"], name="sm")]
    model = _fixed(nodes, {"x": ["N", 4], "b": [4]}, ["s", "y"])
    with pytest.raises(CompileError, match="node 'sm' \\(Softmax\\): input 'b' has no batch dimension"):
        compile_model(model, source="m.onnx")
    # a fixed-shape model the graph cannot run per sample either way: the batch error stands
    nodes = [helper.make_node("Mul", ["t", "x"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=0)]
    with pytest.raises(CompileError, match="would (mix|work across) the batch dimension"):
        compile_model(_fixed(nodes, {"x": [10, 10]}, ["y"], {"t": x(10, 10)}), source="m.onnx")
