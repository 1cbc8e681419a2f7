"""The torch weight-noise model against the emulated chip: same quantisation, same per-weight noise statistics."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from nvcim import driver
from nvcim.compiler.quantize import fake_quantize
from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.tools.chip import deploy_backbone, fetch_noise
from nvcim.tools.noise import quantize, weight_noise, weight_std_factor

from zoo import export


def _linear_onnx(path, n_in=200, n_out=200, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out, bias=False).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in))
    export(layer, path, (n_in,), dynamo=False)
    return path, layer.weight.detach()


# docs/device-model.md#state-dependent-presets, written out for K = 2 (middle states 1 and 2)
PRESET_S = {"GAUSSIAN": 1.0, "RRAM4": 4.0, "FEFET2": 2.0}


def _predicted_std(w: torch.Tensor, sigma: float, model: str) -> torch.Tensor:
    """Per-weight noise std the documented model predicts: the preset's band tested on the weight's
    8-bit level (U-SWIM's rule, the chip's default), all four 2-bit cells of a weight alike."""
    _, level, _sign, scale = quantize(w, 8)
    s = PRESET_S[model]
    base = sigma / math.sqrt(0.4 * s * s + 0.6)
    rel = torch.where((level / 255 > 0.25) & (level / 255 < 0.75), s * base, base)
    std = scale * rel * 3.0 * math.sqrt(1 + 16 + 256 + 4096)
    return torch.where(level > 0, std, torch.zeros_like(std))


def test_quantisation_matches_the_compiler():
    w = torch.randn(64, 33) * 0.1
    w_q, level, sign, _scale = quantize(w)
    np.testing.assert_array_equal(w_q.numpy(), fake_quantize(w.numpy(), 8))  # the chip's values, bit for bit
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
    ours = weight_noise(w, DeviceSettings(dump.chip["sigma"], model), torch.Generator().manual_seed(0))
    std = _predicted_std(w, dump.chip["sigma"], model)
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
        assert rel == pytest.approx(weight_std_factor(DeviceSettings(sigma)), rel=0.02)
        assert weight_std_factor(DeviceSettings(sigma)) == pytest.approx(0.78 * sigma, rel=0.01)


def test_noise_is_reproducible_by_seed_and_batched():
    w = torch.randn(10, 20)
    device = DeviceSettings(0.3)
    a = weight_noise(w, device, torch.Generator().manual_seed(3), draws=4)
    b = weight_noise(w, device, torch.Generator().manual_seed(3), draws=4)
    assert a.shape == (4, 10, 20) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert torch.all(weight_noise(w, DeviceSettings(0.0)) == 0)


def test_bad_noise_model_is_a_clear_error():
    with pytest.raises(ValueError, match="device model 'PCM' is not one of"):
        DeviceSettings(0.3, "PCM")
    with pytest.raises(ValueError, match="sigma=-0.1 must be >= 0"):
        DeviceSettings(-0.1)
    assert math.isclose(weight_std_factor(DeviceSettings(0.1)) * 3, weight_std_factor(DeviceSettings(0.3)))
