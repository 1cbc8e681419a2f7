"""onnx's own backend test data, ``pytorch-converted``: every case through compiler and chip.

Each case is a model.onnx with inputs and stored outputs (test_data_set_0). A case whose
ops the chip supports must load on an ideal chip (sigma = 0), match onnxruntime on
``quantized_model`` to float32 rounding (1e-5 of the largest output), and match the stored
outputs: exactly as well where there are no crossbar weights, and within 8-bit weight
quantisation (1e-2 of the largest output) where there are. Every other case must be
refused with a CompileError giving the reason listed in UNSUPPORTED.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from nvcim import driver
from nvcim.compiler import CompileError, quantized_model

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "model.onnx").is_file())

UNSUPPORTED = {  # case -> why the chip refuses it (what the CompileError says)
    # the target of the loss is a (10, 10) constant covering the batch dimension
    "test_PoissonNLLLLoss_no_reduce": "would mix the batch dimension",
}


def _tensors(case: str, prefix: str) -> list[np.ndarray]:
    files = sorted((DATA / case / "test_data_set_0").glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]


def test_the_data_set_is_there():
    assert len(CASES) >= 80 and set(UNSUPPORTED) <= set(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c not in UNSUPPORTED])
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


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_case_is_refused_with_its_reason(case):
    with pytest.raises(CompileError, match=UNSUPPORTED[case]):
        driver.load(DATA / case / "model.onnx", device="emu://?sigma=0&arrays=4")
