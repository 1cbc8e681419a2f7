"""Property tests of the ONNX front end, on mutations of a small valid model.

Mutations: attribute values (any int, float, NaN, infinity, lists of other lengths), input
dimensions (0, negative, huge, symbolic), initializers (non-finite values, other shapes),
op types swapped, nodes dropped or their inputs swapped, and bytes of the serialised file
flipped or cut. Asserted for each: compiling gives a program or a CompileError /
CapacityError (never another exception, a MemoryError included); a program it gives is
accepted by PROGRAM_LOAD (the compiler and the chip agree on the bounds) and runs, or its
run is refused with a named error (never INTERNAL).

The fast profile runs in the default suite; ``NVCIM_FUZZ=long`` the long one
(docs/reliability.md#bounded-inputs gives its figures; ``-s`` prints the tallies).
"""

from __future__ import annotations

import collections
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from nvcim.compiler import CapacityError, CompileError, Target, compile_model
from nvcim.firmware_emu.chip import ChipError
from nvcim.firmware_emu.contract.protocol import ErrorCode

from chip_programs import GEOMETRY, load, new_chip, run, small_model
from fuzzing import fuzz

FUZZ = fuzz(fast=30, long=2500)
TALLY: collections.Counter = collections.Counter()
OPS = ["Relu", "Neg", "Conv", "MaxPool", "Gemm", "Softmax", "Concat", "Pad", "Clip", "Flatten", "Add", "MatMul",
       "Transpose", "Reshape", "AveragePool", "Sigmoid", "NoSuchOp"]
any_int = st.one_of(st.integers(-3, 9), st.sampled_from([-2 ** 31, 2 ** 31 - 1, 10 ** 9, -(10 ** 12), 2 ** 62]))
any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e30]))


@pytest.fixture(scope="module")
def base():
    folder = tempfile.TemporaryDirectory()
    yield small_model(), Path(folder.name)
    folder.cleanup()
    if TALLY:
        print("\nonnx fuzz:", dict(sorted(TALLY.items())))


def _mutate(draw, model: onnx.ModelProto) -> tuple[str, onnx.ModelProto]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = draw(st.sampled_from(["attribute", "attribute", "input", "initializer", "op", "drop", "wire"]))
    node = g.node[draw(st.integers(0, len(g.node) - 1))]
    if kind == "attribute":
        if node.attribute and draw(st.booleans()):
            a = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            name = a.name
            node.attribute.remove(a)
        else:
            name = draw(st.sampled_from(["alpha", "beta", "transB", "group", "pads", "strides", "kernel_shape",
                                         "ceil_mode", "axis", "dilations", "epsilon", "perm", "auto_pad"]))
            for a in [a for a in node.attribute if a.name == name]:
                node.attribute.remove(a)
        value = draw(st.one_of(any_int, any_float, st.lists(any_int, max_size=6), st.lists(any_float, max_size=4),
                               st.sampled_from(["SAME_UPPER", "VALID", "bogus"])))
        if value != []:
            node.attribute.append(helper.make_attribute(name, value))
    elif kind == "input":
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[draw(st.integers(0, len(dims) - 1))]
        if draw(st.booleans()):
            d.dim_param = draw(st.sampled_from(["N", "M", ""]))
        else:
            d.dim_value = draw(st.one_of(st.integers(-2, 12), st.sampled_from([10 ** 9, 2 ** 40])))
    elif kind == "initializer":
        init = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        value = numpy_helper.to_array(init).copy()
        if value.dtype.kind == "f" and value.size and draw(st.booleans()):
            value.reshape(-1)[draw(st.integers(0, value.size - 1))] = draw(any_float)
        else:
            shape = draw(st.lists(st.integers(0, 6), max_size=4))
            value = np.resize(value, shape).astype(value.dtype)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    elif kind == "op":
        node.op_type = draw(st.sampled_from(OPS))
    elif kind == "drop":
        g.node.remove(node)
    else:
        names = [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names + ["", "nowhere"]))
    return kind, m


def _compile(path_or_model) -> None:
    try:
        program = compile_model(path_or_model, Target(**GEOMETRY))
    except (CompileError, CapacityError) as e:
        TALLY[f"refused ({type(e).__name__})"] += 1
        return
    TALLY["compiled"] += 1
    chip = new_chip()
    load(chip, program.code_bytes())  # what the compiler gives, the chip takes
    try:
        run(chip)
    except ChipError as e:
        assert e.code != ErrorCode.INTERNAL, e
        TALLY[f"run refused ({e.code.name})"] += 1
    else:
        TALLY["ran"] += 1


@FUZZ
@given(data=st.data())
def test_mutated_models_compile_or_raise_a_compile_error(base, data):
    model, folder = base
    draw = data.draw
    kind, mutated = _mutate(lambda s: draw(s), model)
    if draw(st.integers(0, 2)) == 0:
        mutated = _mutate(lambda s: draw(s), mutated)[1]  # a second change on top
    TALLY["model mutations"] += 1
    TALLY[kind] += 1
    _compile(mutated)


@FUZZ
@given(data=st.data())
def test_damaged_model_files_compile_or_raise_a_compile_error(base, data):
    model, folder = base
    raw = bytearray(model.SerializeToString())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            del raw[at:]
            if not raw:
                break
    path = folder / "damaged.onnx"
    path.write_bytes(bytes(raw))
    TALLY["file mutations"] += 1
    _compile(path)


def test_non_finite_initializer_is_refused_by_node():
    model = small_model()
    w = next(t for t in model.graph.initializer if t.name == "fc")
    value = numpy_helper.to_array(w).copy()
    value[0, 0] = math.nan
    w.CopyFrom(numpy_helper.from_array(value, "fc"))
    with pytest.raises(CompileError, match=r"node 'fc' \(Gemm\): weight 'fc' holds non-finite values"):
        compile_model(model, Target(**GEOMETRY))


def test_a_name_that_is_not_utf8_is_a_compile_error(tmp_path):
    """Found by the fuzz test: protobuf hands such a name over as bytes, and the program's
    build (or onnx's checker) then failed with an AttributeError or UnicodeDecodeError."""
    path = tmp_path / "bad.onnx"
    path.write_bytes(small_model().SerializeToString().replace(b"relu", b"r\xc3lu"))
    with pytest.raises(CompileError, match="is not valid UTF-8"):
        compile_model(path, Target(**GEOMETRY))


def test_an_initializer_whose_data_does_not_fill_its_dims_is_a_compile_error():
    """Found by the fuzz test: a damaged file's initializer made numpy raise ValueError."""
    model = small_model()
    w = next(t for t in model.graph.initializer if t.name == "fb")
    w.data_type = onnx.TensorProto.UINT8  # its 20 bytes read as 20 values of 1 byte for its 5
    with pytest.raises(CompileError, match="initializer 'fb' cannot be read"):
        compile_model(model, Target(**GEOMETRY))
