"""NFT (OVF, IRS): the feedback loss as docs/methods.md writes it, and backbones that deploy like any other."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.tools import datasets
from nvcim.tools.methods import run_method
from nvcim.tools.models import build
from nvcim.tools.nft import IRS, OVF, train_nft
from nvcim.tools.noise import noisy_weight
from nvcim.tools.onnx_io import export, read_meta
from nvcim.tools.outcome import ChipSpec
from nvcim.tools.train import TrainConfig, injected_weights


@pytest.fixture(scope="module")
def data() -> datasets.Split:
    d = datasets.load("digits", image_size=28)
    return datasets.Split(d.x_train[:300], d.y_train[:300], d.x_test[:150], d.y_test[:150], "digits")


def test_ovf_loss_is_the_papers_formula():
    torch.manual_seed(0)
    model = build("lenet3", 1, 10)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    names = model.weight_names()
    gen = torch.Generator().manual_seed(4)
    weights = injected_weights(model, names, DeviceSettings(0.2), gen)
    loss, out = OVF(0.2, beta=0.1).loss(model, weights, x, y, gen)

    # by hand: the same draws, in the same order, from a generator in the same state
    gen = torch.Generator().manual_seed(4)
    w0 = {n: noisy_weight(dict(model.named_parameters())[n], DeviceSettings(0.2), gen) for n in names}
    o = functional_call(model, w0, (x,))
    outs = [functional_call(model, {n: noisy_weight(dict(model.named_parameters())[n], DeviceSettings(s), gen)
                                    for n in names}, (x,)) for s in (0.25, 0.30, 0.35)]
    feedback = 1e-2 * outs[0] + 1e-1 * outs[1] + 1.0 * outs[2]
    expected = torch.nn.functional.cross_entropy(o / 4 - 0.1 * feedback / 4, y)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(loss, expected)


def test_irs_loss_is_the_papers_formula_over_block_end_snapshots():
    torch.manual_seed(0)
    model = build("lenet3", 1, 10)
    irs = IRS(model, beta=0.5)
    assert len(irs.heads) == 2
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in model.weight_names()}
    loss, out = irs.loss(model, weights, x, y, torch.Generator())

    # by hand: the features after each conv block, through the heads, gamma_n = 10^(1 - n), a = 1 / 3
    f1 = model.conv1(x)
    f2 = model.conv2(torch.nn.functional.max_pool2d(torch.relu(f1), 2))
    feedback = irs.heads[0](f1) + 0.1 * irs.heads[1](f2)
    expected = torch.nn.functional.cross_entropy(model(x) / 3 - 0.5 * feedback / 3, y)
    torch.testing.assert_close(loss, expected)
    loss.backward()  # one loss trains the backbone and the heads together (Algorithm 2)
    assert model.conv1.weight.grad.abs().sum() > 0 and all(p.grad is not None for p in irs.parameters())


def test_nft_backbones_deploy_with_and_without_a_tsb(data, tmp_path):
    cfg = TrainConfig(epochs=3, stop_fraction=None, val_draws=2, lr=1e-2)
    for variant in ("ovf", "irs"):
        result = train_nft(data, cfg, variant, log=lambda s: None, progress=False)
        assert result.history[-1]["train_acc"] > 0.2  # it learns
        path = export(result.model, tmp_path / f"{variant}.onnx", role="backbone")
        assert not any(k.startswith("heads") for k in read_meta(path)[1])  # heads are training-only
    plain = run_method("deployed", path, ChipSpec(0.3, 2), data)
    with_tsb = run_method("tsb", path, ChipSpec(0.3, 2), data, epochs=1)
    assert plain.stages["deploy"].write_pulses == with_tsb.stages["deploy"].write_pulses
    assert with_tsb.verified_weights == 25
