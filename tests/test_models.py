"""LeNet-3, VGG-8 and ResNet-18, exported by both torch exporters, on an ideal chip (sigma = 0).

The chip must reproduce onnxruntime on ``quantized_model`` (the same graph with the same
8-bit weights). Both sides then hold bit-identical float32 weights, so what remains is the
order of float32 sums (torch's kernels here, MLAS there): measured 0 to 3e-7 of the largest
output for the six model/exporter pairs. The tolerance is 1e-5 of the largest output, 40x
that, and 100x below the effect of 8-bit quantisation (1.5-2.7e-3 against the float
model), which the test also checks is visible, so a wrong weight could not hide in it.
Channel counts are scaled down (stated per model in tests/zoo.py) so the suite stays fast.
tests/test_float_reference.py checks the same chip against the float model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from nvcim import driver
from nvcim.compiler import compile_model, lower_model, quantized_model, reference

from zoo import MODELS, ConvBN, export, randomised

TOLERANCE = 1e-5  # of the largest |output|; see the module docstring


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in ("torchscript", "dynamo")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    name, exporter = request.param
    build, shape, arrays = MODELS[name]
    model = randomised(build)
    path = export(model, tmp_path_factory.mktemp(name) / f"{name}_{exporter}.onnx", shape, exporter == "dynamo")
    return name, path, model, shape, arrays


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_model_on_ideal_chip_matches_onnxruntime_on_quantised_model(exported):
    name, path, model, shape, arrays = exported
    x = np.random.default_rng(1).standard_normal((5, *shape)).astype(np.float32)
    with driver.load(path, device=f"emu://?sigma=0&arrays={arrays}") as sess:
        y, = sess.run(None, {"x": x})
    ref, = ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, {"x": x})
    float_ref, = ort.InferenceSession(path).run(None, {"x": x})
    assert y.shape == ref.shape == (5, 10)
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
    # the comparison can see 8-bit quantisation, so it could see a wrong weight
    assert _max_rel(y, float_ref) > 10 * TOLERANCE
    with torch.no_grad():  # and the exported file is the torch model
        np.testing.assert_allclose(float_ref, model(torch.from_numpy(x)).numpy(), rtol=0,
                                   atol=1e-4 * np.abs(float_ref).max())


def test_model_per_channel_quantisation(exported):
    """Per-output-channel scales: the ideal chip matches onnxruntime on that quantisation,
    and every weight is within half a step of its own channel's (finer) scale."""
    name, path, model, shape, arrays = exported
    x = np.random.default_rng(2).standard_normal((4, *shape)).astype(np.float32)
    program = compile_model(path, per_channel=True)
    y, = reference.run(program, [x])
    ref, = ort.InferenceSession(quantized_model(path, per_channel=True).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
    lowered, _ = lower_model(path)
    for i, layer in enumerate(program.layers):
        w = lowered.weights[layer.name]
        step = np.asarray(layer.scale, dtype=np.float64)
        assert step.shape == (layer.out_features,)
        np.testing.assert_allclose(step, np.abs(w).max(axis=0) / 255, rtol=1e-6)
        # half a step, plus the float32 rounding of the weight the chip holds
        bound = step / 2 + np.abs(w).max(axis=0) * 2.0 ** -23
        assert (np.abs(reference.ideal_weights(program, i) - w) <= bound).all()


def test_unoptimised_dynamo_export_is_folded_by_the_front_end(tmp_path):
    """dynamo with optimize=False leaves BatchNormalization and Shape -> Squeeze -> Reshape ->
    Concat arithmetic in the graph; the front end folds both, keeping the weight names."""
    path = export(randomised(ConvBN), tmp_path / "raw.onnx", (3, 8, 8), dynamo=True, optimize=False)
    raw_ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"BatchNormalization", "Shape"} <= raw_ops
    program = compile_model(path)
    assert [layer.name for layer in program.layers] == ["conv.weight", "fc.weight"]
    assert {i.op.name for i in program.instructions} == {"CONV", "ADD", "RELU", "MAXPOOL", "RESHAPE", "MATMUL"}
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y, = reference.run(program, [x])
    ref, = ort.InferenceSession(quantized_model(path).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOLERANCE * np.abs(ref).max())
