"""Bad models get errors naming the file or node, and nothing reaches the chip."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nvcim import driver
from nvcim.compiler import CapacityError, CompileError, Target, compile_model
from nvcim.firmware_emu.chip import Chip


@pytest.fixture
def no_chip_traffic(monkeypatch):
    seen = []
    original = Chip.feed
    monkeypatch.setattr(Chip, "feed", lambda self, data: seen.append(data) or original(self, data))
    return seen


def test_malformed_file_names_the_file(tmp_path, no_chip_traffic):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    with pytest.raises(CompileError, match="garbage.onnx"):
        driver.load(bad)
    assert no_chip_traffic == []


def test_truncated_file_is_refused(tmp_path, mlp_path, no_chip_traffic):
    cut = tmp_path / "cut.onnx"
    data = mlp_path.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(CompileError, match="cut.onnx"):
        driver.load(cut)
    assert no_chip_traffic == []


def test_missing_file(tmp_path):
    with pytest.raises(CompileError, match="no such ONNX file"):
        compile_model(tmp_path / "nope.onnx")


def test_unsupported_op_names_the_node_and_op(tmp_path, no_chip_traffic):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    node = helper.make_node("Hardmax", ["x"], ["y"], name="pick_max")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, path)
    with pytest.raises(CompileError, match="node 'pick_max' uses op Hardmax.*supported: "):
        driver.load(path)
    assert no_chip_traffic == []


def test_model_too_large_for_the_chip_says_how_many_arrays(mlp_path):
    with pytest.raises(CapacityError, match=r"needs \d+ arrays of 256x256 cells; the chip has 2"):
        compile_model(mlp_path, Target(arrays=2))


def test_dynamic_feature_dimension_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "f"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "f"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match="input 'x' has dynamic dimension 1"):
        compile_model(model)


def test_dynamic_spatial_dimensions_are_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "height", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "height", "width"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "any_size.onnx"
    onnx.save(model, path)
    with pytest.raises(CompileError, match=r"any_size.onnx: input 'x' has dynamic dimension 2 \('height'\); "
                                           r"only the batch dimension \(0\) may vary"):
        compile_model(path)


def test_integer_input_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match="input 'x' is INT64; the chip takes float32 inputs"):
        compile_model(model)


def test_capacity_error_counts_arrays_for_a_cnn(tmp_path):
    """A conv layer of 3x3x64 inputs and 64 outputs on 32x32 arrays: each sign needs
    ceil(576/32) row blocks x ceil(64*4/32) column blocks = 144 tiles of one array each."""
    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64, 6, 6])
    model = helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y],
                                                [numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CapacityError, match=r"needs 288 arrays of 32x32 cells; the chip has 100"):
        compile_model(model, Target(arrays=100, rows=32, cols=32))
