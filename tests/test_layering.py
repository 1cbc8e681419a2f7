"""The contract is the floor: host code (driver, compiler) and the contract itself run
without loading the emulator. Checked in a fresh interpreter, where nothing else has
imported the emulator yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nvcim.firmware_emu import contract

ALLOWED = {"nvcim.firmware_emu", "nvcim.firmware_emu.contract"}  # package __init__s that import nothing


def _firmware_modules_loaded(code: str) -> list[str]:
    """The nvcim.firmware_emu modules loaded after running ``code`` in a fresh interpreter."""
    probe = (code + "\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nvcim.firmware_emu'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _emulator(modules: list[str]) -> list[str]:
    return [m for m in modules if m not in ALLOWED and not m.startswith("nvcim.firmware_emu.contract.")]


def test_compiling_and_the_reference_executor_load_no_emulator_module():
    code = """
import numpy as np
from onnx import TensorProto, helper, numpy_helper
import nvcim.driver
import nvcim.compiler
from nvcim.compiler import compile_model, reference

w = np.arange(3 * 2 * 3 * 3, dtype=np.float32).reshape(3, 2, 3, 3) / 50
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
     helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
     helper.make_node("Flatten", ["p"], ["y"])], "tiny",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], [numpy_helper.from_array(w, "w")])
program = compile_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
y, = reference.run(program, [np.ones((2, 2, 4, 4), np.float32)])
assert y.shape == (2, 12) and float(y.max()) > 0
"""
    loaded = _firmware_modules_loaded(code)
    assert "nvcim.firmware_emu.contract.ops" in loaded  # the compiler did read the op table
    assert _emulator(loaded) == []


def test_every_contract_module_imports_nothing_of_the_emulator():
    names = sorted(p.stem for p in Path(contract.__file__).parent.glob("*.py") if p.stem != "__init__")
    assert {"ops", "program_format", "protocol", "registers"} <= set(names)
    code = "\n".join(f"import nvcim.firmware_emu.contract.{n}" for n in names)
    loaded = _firmware_modules_loaded(code)
    assert {f"nvcim.firmware_emu.contract.{n}" for n in names} <= set(loaded)
    assert _emulator(loaded) == []
