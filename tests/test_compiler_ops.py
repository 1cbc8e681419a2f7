"""Every supported op and attribute, on small hand-built graphs: compiled, run with ideal
cells by the chip's executor (as one graph and interpreted) and by the contract's
reference interpreter (the op table's numpy kernels), and compared with onnxruntime on
``quantized_model``. Weights on both sides are the same float32 values,
so only float32 summation order differs: 1e-5 of the largest output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nvcim.compiler import CompileError, compile_model, quantized_model, reference
from nvcim.compiler.lower import HANDLERS
from nvcim.firmware_emu import executor, graph_engine
from nvcim.firmware_emu.contract import interpreter
from nvcim.firmware_emu.contract.ops import OPS
from nvcim.firmware_emu.contract.program_format import Opcode

import op_check
from op_check import build

RNG = np.random.default_rng(0)


def check(model: onnx.ModelProto, graph: bool = True, **shapes) -> object:
    """Compile ``model`` and run it on random inputs of batch 3 every way the chip can
    (``graph``: whether the graph engine can express the program at all), against onnxruntime."""
    feeds = {k: RNG.standard_normal((3, *v)).astype(np.float32) for k, v in shapes.items()}
    return op_check.check(model, feeds, graph)


def w(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


CONVS = {  # name -> (input shape, weight shape, attributes)
    "same_upper_stride2": ((2, 7, 7), (4, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same_lower_even_kernel": ((2, 8, 8), (3, 2, 4, 4), dict(auto_pad="SAME_LOWER", strides=[2, 2])),
    "valid_stride3": ((2, 9, 8), (3, 2, 2, 3), dict(auto_pad="VALID", strides=[3, 3])),
    "asymmetric_pads_dilated": ((3, 9, 9), (4, 3, 3, 3), dict(pads=[0, 1, 2, 1], dilations=[2, 1])),
    "groups": ((4, 6, 6), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    "depthwise_multiplier": ((4, 6, 6), (8, 1, 3, 3), dict(group=4, strides=[2, 1])),
    "pointwise": ((5, 4, 4), (7, 5, 1, 1), {}),
    "conv1d": ((3, 11), (4, 3, 3), dict(strides=[2], pads=[1, 0])),
    "conv3d": ((2, 4, 5, 4), (3, 2, 2, 3, 2), dict(pads=[1, 0, 1, 0, 1, 1])),
}


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv(name, bias):
    shape, wshape, attrs = CONVS[name]
    inits = {"W": w(*wshape)} | ({"B": w(wshape[0])} if bias else {})
    node = helper.make_node("Conv", ["x", "W", "B"] if bias else ["x", "W"], ["y"], **attrs)
    program = check(build([node], {"x": shape}, ["y"], inits), x=shape)
    group = attrs.get("group", 1)
    assert len(program.layers) == group  # one crossbar layer per group, rows (channel, kernel offset)
    assert program.layers[0].in_features == wshape[1] * int(np.prod(wshape[2:]))
    assert program.layers[0].out_features == wshape[0] // group


POOLS = {  # name -> (op, input shape, attributes)
    "max_ceil_pads": ("MaxPool", (2, 6, 7), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1)),
    "max_dilated": ("MaxPool", (2, 9, 9), dict(kernel_shape=[2, 3], dilations=[2, 2], strides=[1, 2])),
    "max_same_upper": ("MaxPool", (2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "max_1d": ("MaxPool", (3, 10), dict(kernel_shape=[4], strides=[3], pads=[1, 2])),
    "avg_exclude_pad": ("AveragePool", (2, 6, 6), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "avg_include_pad": ("AveragePool", (2, 6, 6), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                                       count_include_pad=1)),
    "avg_ceil_exclude": ("AveragePool", (2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1],
                                                        ceil_mode=1)),
    "avg_ceil_include": ("AveragePool", (2, 7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1],
                                                        ceil_mode=1, count_include_pad=1)),
    "avg_3d": ("AveragePool", (2, 4, 5, 4), dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2])),
    "global_avg": ("GlobalAveragePool", (3, 5, 4), {}),
    "global_max": ("GlobalMaxPool", (3, 5, 4), {}),
}


@pytest.mark.parametrize("name", POOLS)
def test_pool(name):
    op, shape, attrs = POOLS[name]
    # counted ceil_mode padding has no exact graph form: the interpreter runs that one
    check(build([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": shape}, ["y"]),
          graph=name != "avg_ceil_include", x=shape)


def _bn_inits(c: int) -> dict[str, np.ndarray]:
    return {"g": RNG.uniform(0.5, 1.5, c).astype(np.float32), "b": w(c), "m": w(c),
            "v": RNG.uniform(0.5, 2.0, c).astype(np.float32)}


def test_batchnorm_after_conv_is_folded_into_its_weight():
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=1e-3)]
    program = check(build(nodes, {"x": (3, 5, 5)}, ["y"], {"W": w(4, 3, 3, 3), "B": w(4)} | _bn_inits(4)),
                    x=(3, 5, 5))
    assert [layer.name for layer in program.layers] == ["W"]
    assert [i.op for i in program.instructions] == [Opcode.CONV, Opcode.ADD]


def test_batchnorm_after_gemm_is_folded():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"])]
    program = check(build(nodes, {"x": (6,)}, ["y"], {"W": w(4, 6), "B": w(4)} | _bn_inits(4)), x=(6,))
    assert [i.op for i in program.instructions] == [Opcode.MATMUL, Opcode.ADD]


def test_batchnorm_that_cannot_fold_runs_digitally():
    # after a ReLU there is no weight to fold into; a conv weight used twice must not change either
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y1"]),
             helper.make_node("Conv", ["x", "W"], ["c2"]),
             helper.make_node("BatchNormalization", ["c2", "g", "b", "m", "v"], ["y2"])]
    program = check(build(nodes, {"x": (4, 5, 5)}, ["y1", "y2"], {"W": w(4, 4, 1, 1)} | _bn_inits(4)),
                    x=(4, 5, 5))
    assert sum(i.op == Opcode.MUL for i in program.instructions) == 2
    assert len(program.layers) == 1


UNARY = [("Relu", {}), ("LeakyRelu", {"alpha": 0.2}), ("Sigmoid", {}), ("Tanh", {}), ("Elu", {"alpha": 0.7}),
         ("Selu", {}), ("Softplus", {}), ("Softsign", {}), ("Exp", {}), ("Neg", {}), ("Abs", {}),
         ("Identity", {}), ("Dropout", {})]


@pytest.mark.parametrize("op,attrs", UNARY, ids=[u[0] for u in UNARY])
def test_unary(op, attrs):
    check(build([helper.make_node("Mul", ["x", "k"], ["s"]), helper.make_node(op, ["s"], ["y"], **attrs)],
                {"x": (4, 5)}, ["y"], {"k": np.float32(8.0)}), x=(4, 5))  # x8: large values, both signs


def test_clip_with_min_only_and_with_both():
    nodes = [helper.make_node("Clip", ["x", "lo"], ["a"]), helper.make_node("Clip", ["x", "lo", "hi"], ["b"])]
    check(build(nodes, {"x": (7,)}, ["a", "b"], {"lo": np.float32(-0.5), "hi": np.float32(0.25)}), x=(7,))


def test_binary_ops_with_constants_and_tensors():
    nodes = [helper.make_node("Sub", ["x", "c"], ["a"]), helper.make_node("Div", ["a", "d"], ["b"]),
             helper.make_node("Mul", ["b", "x"], ["m"]), helper.make_node("Sum", ["m", "x", "b"], ["s"]),
             helper.make_node("PRelu", ["s", "slope"], ["y"])]
    check(build(nodes, {"x": (3, 2, 2)}, ["y"], {"c": w(3, 1, 1), "d": RNG.uniform(1, 2, (2,)).astype(np.float32),
                                               "slope": w(3, 1, 1)}), x=(3, 2, 2))


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_and_log_softmax(axis):
    nodes = [helper.make_node("Softmax", ["x"], ["a"], axis=axis),
             helper.make_node("LogSoftmax", ["x"], ["b"], axis=axis)]
    check(build(nodes, {"x": (3, 4, 5)}, ["a", "b"]), x=(3, 4, 5))


def test_data_movement_chain():
    """Reshape (0 and -1), Transpose, Slice (negative step, stride, axes), Pad (every mode),
    Concat, Split, Squeeze/Unsqueeze, Flatten."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r1"]),                       # (N, 4, 6) -> (N, 2, 12)
        helper.make_node("Reshape", ["r1", "s2"], ["r2"]),                      # -> (N, 6, 4) with -1 first
        helper.make_node("Transpose", ["r2"], ["t"], perm=[0, 2, 1]),           # (N, 4, 6)
        helper.make_node("Slice", ["t", "st", "en", "ax", "sp"], ["sl"]),        # (N, 2, 3)
        helper.make_node("Pad", ["sl", "pads", "pv"], ["p1"], mode="constant"),
        helper.make_node("Pad", ["sl", "pads"], ["p2"], mode="reflect"),
        helper.make_node("Pad", ["sl", "pads"], ["p3"], mode="edge"),
        helper.make_node("Concat", ["p1", "p2", "p3"], ["c"], axis=2),
        helper.make_node("Split", ["c", "split"], ["a", "b"], axis=1),
        helper.make_node("Unsqueeze", ["a", "ua"], ["u"]),
        helper.make_node("Squeeze", ["u", "ua"], ["q"]),
        helper.make_node("Flatten", ["q"], ["f"], axis=1),
    ]
    inits = {"s1": i64(0, 2, 12), "s2": i64(-1, 6, 4), "st": i64(-1, 0), "en": i64(-100, 6), "ax": i64(1, 2),
             "sp": i64(-2, 2), "pads": i64(0, 1, 2, 0, 0, 1), "pv": np.float32(0.5), "split": i64(1, 2),
             "ua": i64(3)}
    check(build(nodes, {"x": (4, 6)}, ["f", "b"], inits), x=(4, 6))


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op, keepdims):
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    check(build([node], {"x": (3, 4, 5)}, ["y"], {"axes": np.array([2, -1], np.int64)}, opset=18), x=(3, 4, 5))


def test_gemm_attributes_and_matmul_on_rank_3():
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=1, alpha=0.7, beta=1.3),
             helper.make_node("Reshape", ["g", "s"], ["r"]),
             helper.make_node("MatMul", ["r", "M"], ["y"])]
    check(build(nodes, {"x": (6,)}, ["y"], {"W": w(8, 6), "C": w(1, 8), "s": np.array([0, 2, 4], np.int64),
                                           "M": w(4, 5)}), x=(6,))


def test_constant_subgraphs_are_folded_into_weights():
    """Weights produced by Constant -> Transpose, Identity and Reshape nodes become layers."""
    wt = w(5, 6)
    nodes = [helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(wt)),
             helper.make_node("Transpose", ["wc"], ["wt"], perm=[1, 0]),
             helper.make_node("Identity", ["wt"], ["wi"]),
             helper.make_node("MatMul", ["x", "wi"], ["h"]),
             helper.make_node("Reshape", ["kflat", "kshape"], ["k"]),
             helper.make_node("Reshape", ["h", "hshape"], ["h4"]),
             helper.make_node("Conv", ["h4", "k"], ["y"])]
    inits = {"kflat": w(2 * 5), "kshape": np.array([2, 5, 1, 1], np.int64), "hshape": np.array([0, 5, 1, 1], np.int64)}
    program = check(build(nodes, {"x": (6,)}, ["y"], inits), x=(6,))
    assert len(program.layers) == 2
    np.testing.assert_allclose(reference.ideal_weights(program, 0), wt.T, atol=np.abs(wt).max() / 255)


def test_batch_size_arithmetic_folds_to_a_reshape():
    """x.view(x.size(0), -1) as TorchScript exports it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    program = check(build(nodes, {"x": (2, 3, 4)}, ["y"], inits), x=(2, 3, 4))
    assert [(i.op, i.attrs["shape"]) for i in program.instructions] == [(Opcode.RESHAPE, [-1, 24])]


def test_old_opsets_are_converted():
    """Opset 9 forms: Pad/Slice/Clip attributes, Dropout ratio, Softmax on a 2-D coerced input."""
    nodes = [helper.make_node("Pad", ["x"], ["p"], pads=[0, 1, 0, 0, 2, 0], value=0.5),
             helper.make_node("Slice", ["p"], ["s"], starts=[1], ends=[4], axes=[1]),
             helper.make_node("Clip", ["s"], ["c"], min=-0.5, max=0.5),
             helper.make_node("Dropout", ["c"], ["d"], ratio=0.3),
             helper.make_node("Flatten", ["d"], ["f"], axis=1),
             helper.make_node("Softmax", ["f"], ["y"], axis=1)]
    model = build(nodes, {"x": (4, 3)}, ["y"], opset=9)
    check(model, x=(4, 3))
    x = RNG.standard_normal((2, 4, 3)).astype(np.float32)  # no weights: the original model is the reference
    want, = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(reference.run(compile_model(model), [x])[0], want, rtol=0, atol=1e-6)


# -- errors ---------------------------------------------------------------------------
BATCH_MIXING = {
    "Transpose": ([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2], name="swap")], {},
                  "node 'swap' \\(Transpose\\).*moves the batch dimension"),
    "Reshape": ([helper.make_node("Reshape", ["x", "s"], ["y"], name="fold")], {"s": np.array([-1, 4], np.int64)},
                "node 'fold' \\(Reshape\\).*mix the batch dimension"),
    "Concat": ([helper.make_node("Concat", ["x", "x"], ["y"], axis=0, name="cat")], {},
               "node 'cat' \\(Concat\\): axis=0 would work across the batch"),
    "Softmax": ([helper.make_node("Softmax", ["x"], ["y"], axis=0, name="sm")], {}, "node 'sm' .*axis=0"),
    "Slice": ([helper.make_node("Slice", ["x", "a", "b", "c"], ["y"], name="cut")],
              {"a": np.array([1], np.int64), "b": np.array([2], np.int64), "c": np.array([0], np.int64)},
              "node 'cut' \\(Slice\\): slicing the batch dimension"),
    "Flatten": ([helper.make_node("Flatten", ["x"], ["y"], axis=2, name="fl")], {}, "node 'fl' \\(Flatten\\): axis=2"),
    "constant over batch": ([helper.make_node("Add", ["x", "k"], ["y"], name="add")],
                            {"k": np.ones((5, 4, 3), np.float32)},
                            "node 'add' \\(Add\\): output 'y' would mix the batch dimension"),
}


@pytest.mark.parametrize("case", BATCH_MIXING)
def test_ops_that_would_mix_the_batch_dimension_are_refused(case):
    nodes, inits, message = BATCH_MIXING[case]
    with pytest.raises(CompileError, match=message):
        compile_model(build(nodes, {"x": (4, 3)}, ["y"], inits), source="model.onnx")


def test_batch_size_used_in_arithmetic_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT, name="to_float"),
             helper.make_node("Mul", ["x", "nf"], ["y"], name="scale_by_batch")]
    with pytest.raises(CompileError, match="node 'to_float' \\(Cast\\) uses 'n', which is computed from the batch"):
        compile_model(build(nodes, {"x": (3,)}, ["y"], {"zero": np.array(0, np.int64)}))


UNSUPPORTED = {
    "weight computed on the chip": ([helper.make_node("Conv", ["x", "x"], ["y"], name="c")], {},
                                    "node 'c' \\(Conv\\): weight 'x' must be a constant"),
    "pool indices": ([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2], name="mp")], {},
                     "node 'mp' \\(MaxPool\\): the Indices output is not supported"),
    "auto_pad value": ([helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SOMETIMES", name="c")],
                       {"W": w(2, 4, 1)},
                       "node 'c' \\(Conv\\): auto_pad=SOMETIMES is not supported \\(supported: NOTSET, VALID"),
    "training dropout": ([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="d")],
                         {"r": np.float32(0.5), "t": np.bool_(True)}, "node 'd' \\(Dropout\\): training_mode=true"),
    "cast to int": ([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32, name="c"),
                     helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)], {},
                    "node 'c' \\(Cast\\): cast to INT32 is not supported"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_attribute_values_name_node_and_choices(case):
    nodes, inits, message = UNSUPPORTED[case]
    with pytest.raises(CompileError, match="model.onnx: " + message):
        compile_model(build(nodes, {"x": (4, 3)}, ["y"], inits), source="model.onnx")


def test_opset_newer_than_onnx_is_refused():
    model = build([helper.make_node("Relu", ["x"], ["y"])], {"x": (3,)}, ["y"])
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(CompileError, match="newer than the installed onnx supports"):
        compile_model(model, source="model.onnx")


def test_newest_opset_forms():
    """Opset onnx_opset_version(): Pad with an axes input, Split by num_outputs, Reduce with an
    axes input, AveragePool with dilations. onnxruntime may not know this opset yet, so onnx's
    own ReferenceEvaluator on the quantised model is the reference."""
    from onnx.reference import ReferenceEvaluator

    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2], dilations=[1, 1],
                              ceil_mode=1),
             helper.make_node("Pad", ["p", "pads", "", "axes"], ["q"], mode="edge"),
             helper.make_node("Split", ["q"], ["a", "b"], axis=1, num_outputs=2),
             helper.make_node("ReduceMean", ["a", "raxes"], ["y"], keepdims=0)]
    inits = {"W": w(4, 3, 3, 3), "B": w(4), "pads": np.array([1, 0, 2, 1], np.int64),
             "axes": np.array([2, 3], np.int64), "raxes": np.array([2], np.int64)}
    model = build(nodes, {"x": (3, 5, 5)}, ["y", "b"], inits, opset=onnx.defs.onnx_opset_version())
    x = RNG.standard_normal((2, 3, 5, 5)).astype(np.float32)
    program = compile_model(model)
    want = ReferenceEvaluator(quantized_model(model)).run(None, {"x": x})
    weights = [reference.ideal_weights(program, i) for i in range(len(program.layers))]
    for got in (graph_engine.graph_for(program, weights.__getitem__).run([x]),
                executor.run(program, [x], weights.__getitem__, engine=False),
                interpreter.run(program, [x], weights.__getitem__)):
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.abs(r).max())


def test_every_onnx_operator_the_op_table_names_is_lowered_to_its_opcode():
    """The op table (and the program-format doc rendered from it) says which ONNX operators
    become each opcode; the compiler must handle each of them, and every opcode must be
    reachable from some ONNX operator."""
    named = {name: spec.opcode for spec in OPS.values() for name in spec.onnx}
    assert set(named) <= set(HANDLERS), sorted(set(named) - set(HANDLERS))
    assert {spec.opcode for spec in OPS.values() if spec.onnx} == set(Opcode)
    for name, want in [("Relu", Opcode.RELU), ("Sigmoid", Opcode.SIGMOID), ("Neg", Opcode.NEG),
                       ("Softsign", Opcode.SOFTSIGN), ("Exp", Opcode.EXP), ("Abs", Opcode.ABS)]:
        program = check(build([helper.make_node(name, ["x"], ["y"])], {"x": (4,)}, ["y"]), x=(4,))
        assert [i.op for i in program.instructions] == [named[name]] == [want]
