"""onnx's own backend test data, ``pytorch-converted``: every case through compiler and chip.

Each case is a model.onnx with inputs and stored outputs (test_data_set_0). A case whose
ops the chip supports must load on an ideal chip (sigma = 0), match onnxruntime on
``quantized_model`` to float32 rounding (1e-5 of the largest output), and match the stored
outputs: exactly as well where there are no crossbar weights, and within 8-bit weight
quantisation (1e-2 of the largest output) where there are. Every case is supported
(ConvTranspose, integer Gather and a fixed (10, 10) input that is no batch included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from nvcim import driver
from nvcim.compiler import quantized_model

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "model.onnx").is_file())

def _tensors(case: str, prefix: str) -> list[np.ndarray]:
    files = sorted((DATA / case / "test_data_set_0").glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def test_the_data_set_is_there():
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES)
def test_supported_case_runs_on_the_chip(case):
    path = DATA / case / "model.onnx"
    inputs, stored = _tensors(case, "input"), _tensors(case, "output")
    with driver.load(path, device="emu://?sigma=0&arrays=4") as sess:
        names = [i.name for i in sess.get_inputs()]
        got = sess.run(None, dict(zip(names, inputs)))
        weighted = bool(sess.program.layers)
    want = ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, dict(zip(names, inputs)))
    for g, w, s in zip(got, want, stored, strict=True):
        scale = float(np.abs(s).max()) or 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(g, s, rtol=0, atol=(1e-2 if weighted else 1e-5) * scale)

