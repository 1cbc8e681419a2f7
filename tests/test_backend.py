"""onnx's own backend test runner drives the chip through driver.backend."""

import unittest

import numpy as np
import onnx.backend.test
import pytest
from onnx import TensorProto, helper

from nvcim.driver import backend as chip_backend

# Node cases whose ops run on the chip's digital unit (exact, no quantisation): the
# runner compares them with onnx's stored outputs at its own tolerances. Cases whose
# inputs do not all start with a batch dimension (e.g. test_add_bcast, y of shape (5,))
# are outside what the chip takes: every graph input's dimension 0 is its batch.
CASES = ["test_relu_cpu", "test_add_cpu", "test_flatten_axis1_cpu"]


def _selected_cases() -> unittest.TestSuite:
    runner = onnx.backend.test.BackendTest(chip_backend, __name__)
    for name in CASES:
        runner.include(f"^{name}$")
    suite = unittest.TestSuite()
    pending = [runner.test_suite]
    while pending:
        item = pending.pop()
        if isinstance(item, unittest.TestSuite):
            pending.extend(item)
        elif item.id().rsplit(".", 1)[-1] in CASES:
            suite.addTest(item)
    return suite


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # onnx builds all its cases, some overflow on purpose
def test_onnx_backend_runner_passes_on_the_chip():
    suite = _selected_cases()
    assert suite.countTestCases() == len(CASES)
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    assert result.wasSuccessful() and not result.skipped, (result.failures, result.errors, result.skipped)


def test_run_model_with_a_weight_layer():
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.ones((2, 4), np.float32)
    assert chip_backend.supports_device("CPU") and not chip_backend.supports_device("CUDA")
    y, = chip_backend.run_model(model, [x])
    step = np.abs(w).max() / 255
    assert np.abs(y - x @ w).max() <= 4 * step / 2 + 1e-6  # four weights, each within half a level


def test_backend_chip_is_the_argument_else_the_environment_else_an_ideal_chip(monkeypatch):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def arrays(**kwargs) -> int:
        rep = chip_backend.prepare(model, **kwargs)
        try:
            return rep.session.device.identity.geometry.arrays
        finally:
            rep.session.close()

    monkeypatch.delenv("NVCIM_DEVICE", raising=False)
    assert arrays() == 256
    monkeypatch.setenv("NVCIM_DEVICE", "emu://?arrays=3")
    assert arrays() == 3
    assert arrays(nvcim_device="emu://?arrays=5") == 5
