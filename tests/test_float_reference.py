"""The ideal chip (sigma = 0) against onnxruntime on the ORIGINAL float model.

test_models.py compares the chip with ``quantized_model``, which the compiler's own front
end makes: a front-end bug (a wrong BatchNorm fold, say) is then on both sides and cannot
show. Here the reference is the file as torch exported it (with ``do_constant_folding=False``
so its BatchNormalization nodes stay) or as written with onnx.helper, run by onnxruntime,
and no code of the compiler touches it.

The chip then differs from it by 8-bit weight quantisation, and the tolerance is derived
from that. A layer whose weights peak at max|W s| (s: the scale of a BatchNorm right after
it, which the chip folds in; 1 without one) is held on a grid of step
d = max|W s| / (2^8 - 1), so each weight is off by at most d/2, an error spread evenly over
[-d/2, d/2] and uncorrelated between weights. How those errors add up through the network
is measured, not bounded (a worst-case bound adds every error with the same sign: about
sqrt(fan-in) times the typical sum per layer, 24x for a 3x3x64 conv, compounding over the
layers, far too loose to see a wrong fold): onnxruntime runs the float model again with
every weight moved by a uniform draw over [-d/2, d/2] (divided by s, in the file's own
units), DRAWS times, and the largest output change is the quantisation effect E. The chip must be within
``MARGIN`` E of the float model. Measured chip error / E: 0.44-0.77 on the five models.
With the BatchNorm fold subtracting half the mean instead of the mean, 15 (the hand-written
graph), 110 (VGG-8) and 110 (ResNet-18), while the chip still matches ``quantized_model``
exactly. E itself must stay under 3 % of the largest output, so the check has teeth.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from nvcim import driver

from zoo import MODELS, batchnorm_graph, export, export_mlp, randomised

WEIGHT_BITS = 8
DRAWS = 4
MARGIN = 3.0  # chip error <= MARGIN * E; see the module docstring


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def quantisation_noise_scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each crossbar weight's name -> d / s, the quantisation step in the file's units
    (broadcast along its output channels): d from the weight as the chip holds it, times
    the scale of the BatchNormalization that alone reads the layer's output."""
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    scales = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in consts:
            continue
        w = consts[node.input[1]]
        axis = 0 if node.op_type == "Conv" or _attrs(node).get("transB", 0) else w.ndim - 1
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        s = np.ones(w.shape[axis])
        after = readers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization":
            gamma, var = (consts[n] for n in (after[0].input[1], after[0].input[4]))
            s = np.abs(gamma) / np.sqrt(var + _attrs(after[0]).get("epsilon", 1e-5))
        s = s.reshape(shape)
        scales[node.input[1]] = np.abs(w * s).max() / (2 ** WEIGHT_BITS - 1) / s
    return scales


def quantisation_effect(model: onnx.ModelProto, x: np.ndarray, y_float: np.ndarray) -> float:
    """E: the largest output change over DRAWS runs of the float model with every crossbar
    weight moved by uniform noise over its own quantisation step."""
    rng = np.random.default_rng(0)
    scales = quantisation_noise_scales(model)
    effect = 0.0
    for _ in range(DRAWS):
        noisy = onnx.ModelProto()
        noisy.CopyFrom(model)
        for t in noisy.graph.initializer:
            if t.name in scales:
                w = numpy_helper.to_array(t)
                moved = w + rng.uniform(-0.5, 0.5, w.shape) * scales[t.name]
                t.CopyFrom(numpy_helper.from_array(moved.astype(w.dtype), t.name))
        y, = ort.InferenceSession(noisy.SerializeToString()).run(None, {"x": x})
        effect = max(effect, float(np.abs(y - y_float).max()))
    return effect


CASES = {  # name -> (input shape, chip arrays, BatchNormalization nodes in the file)
    "lenet3": (MODELS["lenet3"][1], MODELS["lenet3"][2], False),
    "vgg8": (MODELS["vgg8"][1], MODELS["vgg8"][2], True),
    "resnet18": (MODELS["resnet18"][1], MODELS["resnet18"][2], True),
    "mlp": ((64,), 8, False),
    "batchnorm_graph": ((3, 8, 8), 4, True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def float_model(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp("float") / f"{name}.onnx"
    if name == "mlp":
        export_mlp(path)
    elif name == "batchnorm_graph":
        onnx.save(batchnorm_graph(), path)
    else:
        export(randomised(MODELS[name][0]), path, MODELS[name][1], dynamo=False, do_constant_folding=False)
    return name, str(path)


def test_ideal_chip_is_within_8_bit_quantisation_of_the_float_model(float_model):
    name, path = float_model
    shape, arrays, has_batchnorm = CASES[name]
    model = onnx.load(path)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node) == has_batchnorm
    x = np.random.default_rng(1).standard_normal((4, *shape)).astype(np.float32)
    y_float, = ort.InferenceSession(path).run(None, {"x": x})
    effect = quantisation_effect(model, x, y_float)
    assert 0 < effect < 0.03 * np.abs(y_float).max()
    with driver.load(path, device=f"emu://?sigma=0&arrays={arrays}") as sess:
        y, = sess.run(None, {"x": x})
    error = float(np.abs(y - y_float).max())
    assert error <= MARGIN * effect, \
        (f"{name}: chip is {error:.3g} from the float model, "
         f"{error / effect:.1f}x the 8-bit quantisation effect {effect:.3g}")
