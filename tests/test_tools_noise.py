"""The torch weight-noise model against the emulated chip: same quantisation, same per-weight noise statistics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch

from nvcim import driver
from nvcim.compiler.quantize import fake_quantize
from nvcim.tools.chip import deploy_backbone, fetch_noise
from nvcim.tools.noise import NoiseModel, _state_sigma, quantize, weight_noise


def _linear_onnx(path, n_in=200, n_out=200, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out, bias=False).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (torch.zeros(1, n_in),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return path, layer.weight.detach()


def _predicted_std(w: torch.Tensor, nm: NoiseModel) -> torch.Tensor:
    """Per-weight noise std the model predicts from the weight's slice states."""
    _, level, sign, scale = quantize(w, nm.weight_bits)
    shifts = nm.cell_bits * torch.arange(nm.slices)
    states = ((level.to(torch.int64)[..., None] >> shifts) & 3).to(torch.float32)
    rel = _state_sigma(states, nm) if not nm.uniform else torch.full_like(states, nm.sigma)
    var = ((rel * nm.g_max * 2.0 ** shifts) ** 2).sum(-1)
    return torch.where(level > 0, scale * var.sqrt(), torch.zeros_like(var))


def test_quantisation_matches_the_compiler():
    w = torch.randn(64, 33) * 0.1
    w_q, level, sign, scale = quantize(w)
    np.testing.assert_allclose(w_q.numpy(), fake_quantize(w.numpy(), 8), rtol=1e-6, atol=1e-9)
    assert level.max() == 255 and set(np.unique(sign.numpy())) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("model", ["GAUSSIAN", "RRAM4", "FEFET2"])
def test_per_weight_noise_matches_the_chip(tmp_path, model):
    path, _ = _linear_onnx(tmp_path / "linear.onnx")
    sigma = 0.3
    with driver.open(f"emu://?sigma={sigma}&seed=5&model={model}") as dev:
        deploy_backbone(dev, path)
        dump = fetch_noise(dev, path)
    init = next(t for t in onnx.load(str(path)).graph.initializer)
    w = torch.from_numpy(numpy_helper.to_array(init).copy())  # the exporter may store W transposed
    chip_noise = torch.from_numpy(dump.noise[init.name])
    nm = NoiseModel(dump.chip["sigma"], model)
    ours = weight_noise(w, nm, torch.Generator().manual_seed(0))
    std = _predicted_std(w, nm)
    pulsed = std > 0
    # weights of level 0 are never pulsed: no noise, on the chip and in the model
    assert (~pulsed).sum() > 0
    assert torch.all(chip_noise[~pulsed] == 0) and torch.all(ours[~pulsed] == 0)
    for name, noise in (("chip", chip_noise), ("torch", ours)):
        z = (noise[pulsed] / std[pulsed]).double()
        assert abs(float(z.std()) - 1) < 0.02, f"{name}: normalised noise std {float(z.std()):.4f}"
        assert abs(float(z.mean())) < 0.02, name
    if model == "GAUSSIAN":  # docs/device-model.md's anchor: per-weight std ~ 0.78 sigma max|W|
        rel = float(chip_noise[pulsed].std()) / float(w.abs().max())
        assert rel == pytest.approx(NoiseModel(sigma).weight_std_factor(), rel=0.02)
        assert NoiseModel(sigma).weight_std_factor() == pytest.approx(0.78 * sigma, rel=0.01)


def test_noise_is_reproducible_by_seed_and_batched():
    w = torch.randn(10, 20)
    nm = NoiseModel(0.3)
    a = weight_noise(w, nm, torch.Generator().manual_seed(3), draws=4)
    b = weight_noise(w, nm, torch.Generator().manual_seed(3), draws=4)
    assert a.shape == (4, 10, 20) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert torch.all(weight_noise(w, NoiseModel(0.0)) == 0)


def test_bad_noise_model_is_a_clear_error():
    with pytest.raises(ValueError, match="device model 'PCM' is not one of"):
        NoiseModel(0.3, "PCM")
    assert math.isclose(NoiseModel(0.1).weight_std_factor() * 3, NoiseModel(0.3).weight_std_factor())
