"""The TSB flow on emulated chips: noise fetch, TSB training, incremental reflash, and the errors it refuses."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nvcim import driver
from nvcim.compiler import reference
from nvcim.firmware_emu.contract.program_format import effective_weights
from nvcim.firmware_emu.contract.protocol import CellQuantity
from nvcim.tools import datasets
from nvcim.tools.chip import (
    FlowError,
    NoiseDump,
    chip_logits,
    deploy_backbone,
    fetch_noise,
    flash_tsb,
    program_for,
    program_on_chip,
)
from nvcim.tools.evaluate import predict, quantized_params
from nvcim.tools.noise import quantize
from nvcim.tools.onnx_io import export, load_deploy
from nvcim.tools.train import TrainConfig, train_backbone
from nvcim.tools.tsb import TSBConfig, load_for_training, train_tsb

CHIP = "emu://?sigma=0.3&seed={seed}"


@pytest.fixture(scope="module")
def data() -> datasets.Split:
    d = datasets.load("digits", image_size=28)
    return datasets.Split(d.x_train[:600], d.y_train[:600], d.x_test[:200], d.y_test[:200], "digits")


def _backbone(data, path, seed):
    cfg = TrainConfig(epochs=3, stop_fraction=None, val_draws=2, seed=seed)
    return export(train_backbone(data, cfg, log=lambda s: None, progress=False).model, path, role="backbone")


@pytest.fixture(scope="module")
def backbone(data, tmp_path_factory):
    return _backbone(data, tmp_path_factory.mktemp("bb") / "backbone.onnx", seed=0)


def _read_tiles(dev, program, names, quantity):
    s = program.slices
    return [dev.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, quantity)
            for layer in program.layers if layer.name in names for t in layer.tiles]


def test_torch_with_the_fetched_noise_computes_what_the_chip_computes(data, backbone):
    """The inverse mapping (conv im2col, Gemm transB, +/- tiles, slices) puts each cell's noise on the right weight."""
    with driver.open(CHIP.format(seed=7)) as dev:
        program, cost = deploy_backbone(dev, backbone)
        dump = fetch_noise(dev, backbone)
        chip = chip_logits(dev, program, data.x_test)
    model, _ = load_deploy(backbone)
    from nvcim.tools.chip import noisy_weights
    fixed = {k: torch.from_numpy(v) for k, v in noisy_weights(backbone, dump).items()}
    assert set(fixed) == {"conv1.weight", "conv2.weight", "fc.weight"}
    ours = predict(model, data.x_test, fixed)
    ideal = predict(model, data.x_test, quantized_params(model))
    scale = np.abs(chip).max()
    assert np.abs(chip - ideal).max() > 0.05 * scale  # the noise matters ...
    np.testing.assert_allclose(ours, chip, rtol=0, atol=1e-5 * scale)  # ... and is mapped back exactly
    assert cost.cells == cost.write_pulses > 0


def test_tsb_flow_reflashes_only_the_tsb_cells(data, backbone, tmp_path):
    with driver.open(CHIP.format(seed=7)) as dev:
        program, _ = deploy_backbone(dev, backbone)
        dump = fetch_noise(dev, backbone)
        noise_path = dump.save(tmp_path / "noise.npz")
        model, fixed, dump = load_for_training(backbone, noise_path, 5)
        result = train_tsb(model, fixed, data, TSBConfig(epochs=2, lr=1e-2), log=lambda s: None, progress=False)
        assert len(result.history) == 2
        assert not torch.equal(model.tsb.weight, torch.eye(5))  # it trained
        tsb_path = export(model, tmp_path / "tsb.onnx", role="tsb")

        # onnxruntime runs the augmented model, with the block weight stored once
        ref = ort.InferenceSession(str(tsb_path)).run(None, {"image": data.x_test})[0]
        np.testing.assert_allclose(ref, predict(model, data.x_test), rtol=1e-4, atol=1e-4)

        names = {layer.name for layer in program.layers}
        before = [_read_tiles(dev, program, names, q) for q in CellQuantity]
        new_program, report = flash_tsb(dev, backbone, tsb_path, dump)
        after = [_read_tiles(dev, program, names, q) for q in CellQuantity]
        for b, a in zip(before, after):  # every backbone cell bit-identical: conductance, noise, target
            assert all(np.array_equal(x.view(np.uint32), y.view(np.uint32)) for x, y in zip(b, a))
        assert report.identical and report.tsb_layers == ["tsb.weight"]
        assert report.tsb_weights == 25 and report.verified_fraction == pytest.approx(25 / 5420)
        assert report.verified_fraction < 0.005
        assert report.cost.cells == 100  # 25 weights x 4 cells, on their own sign's tile
        assert 100 <= report.cost.write_pulses < report.full_verify.write_pulses / 50
        assert report.backbone_cells == sum(t.size for t in before[0])

        # on the chip, the TSB model computes what the reference executor computes with the dumped noise
        chip = chip_logits(dev, new_program, data.x_test)
        full = fetch_noise(dev, tsb_path)
        assert set(full.layers) == {"conv1.weight", "conv2.weight", "fc.weight", "tsb.weight"}
        dumped = {layer.name: effective_weights(new_program, i, lambda t, name=layer.name: full.cells[name][t])
                  for i, layer in enumerate(new_program.layers)}
        ref, = reference.run(new_program, [data.x_test], noise=dumped)
        np.testing.assert_allclose(chip, ref, rtol=0, atol=1e-5 * np.abs(chip).max())
        # ... and what torch computes with the chip's weights (backbone and verified TSB)
        w_tsb = quantize(model.tsb.weight)[0] + torch.from_numpy(full.noise["tsb.weight"])
        ours = predict(model, data.x_test, dict(fixed, **{"tsb.weight": w_tsb}))
        np.testing.assert_allclose(ours, chip, rtol=0, atol=1e-4 * np.abs(chip).max())
        # the verified TSB cells sit within the verify tolerance of their targets
        assert np.abs(np.concatenate([c.ravel() for c in full.cells["tsb.weight"]])).max() <= 0.06 * 3 + 1e-6
        assert program_for(dev, tsb_path).layers[-1].name in {layer.name for layer in program_on_chip(dev).layers}


def test_through_finite_converters_the_tsb_gets_arrays_of_its_own(data, backbone, tmp_path):
    """A tile shares its array's ADC range: the TSB's small sums must not be read on the backbone's arrays."""
    for options, own in (("&adc_bits=6", True), ("", False)):
        with driver.open(CHIP.format(seed=7) + options) as dev:
            program, _ = deploy_backbone(dev, backbone)
            dump = fetch_noise(dev, backbone)
            model, _, _ = load_for_training(backbone, dump.save(tmp_path / "noise.npz"), 5)
            new_program, report = flash_tsb(dev, backbone, export(model, tmp_path / "tsb.onnx", role="tsb"), dump)
            taken = {t.array for layer in program.layers for t in layer.tiles}
            tsb = {t.array for layer in new_program.layers if layer.name == "tsb.weight" for t in layer.tiles}
            assert tsb and bool(tsb & taken) is not own and report.identical
            assert dev.read_register("ARRAY_SELECT") == 0xFFFFFFFF


def test_bad_inputs_are_clear_errors(data, backbone, tmp_path):
    other_model = _backbone(data, tmp_path / "other.onnx", seed=1)
    with driver.open(CHIP.format(seed=7)) as dev, driver.open(CHIP.format(seed=8)) as dev8:
        deploy_backbone(dev, backbone)
        deploy_backbone(dev8, backbone)
        mine = fetch_noise(dev, backbone)
        mine.save(tmp_path / "mine.npz")
        fetch_noise(dev8, backbone).save(tmp_path / "chip8.npz")
        model, fixed, _ = load_for_training(backbone, tmp_path / "mine.npz", 5)
        tsb_path = export(model, tmp_path / "tsb.onnx", role="tsb")

        with pytest.raises(FlowError, match="comes from another chip: unique_id=.*, seed=7 .noise file: 8."):
            flash_tsb(dev, backbone, tsb_path, NoiseDump.load(tmp_path / "chip8.npz"))
        with pytest.raises(FlowError, match="captured from another model"):
            load_for_training(other_model, tmp_path / "mine.npz", 5)
        deploy_backbone(dev, backbone)  # programmed again: new noise, the old dump is stale
        with pytest.raises(FlowError, match="does not match the noise this chip captured"):
            flash_tsb(dev, backbone, tsb_path, mine)
        deploy_backbone(dev8, other_model)
        with pytest.raises(FlowError, match="is not on the chip"):
            flash_tsb(dev8, backbone, tsb_path)

    with driver.open(CHIP.format(seed=9)) as fresh:
        with pytest.raises(FlowError, match="holds no program: deploy the backbone first"):
            flash_tsb(fresh, backbone, tsb_path)
    with driver.open("emu://?sigma=0.3&rows=16&cols=64") as small:
        deploy_backbone(small, backbone)
        fetch_noise(small, backbone).save(tmp_path / "small.npz")
    load_for_training(backbone, tmp_path / "small.npz", 16)  # 16 rows x 64 columns: fits exactly
    with pytest.raises(FlowError, match="TSB width c=17 is larger than the chip's arrays"):
        load_for_training(backbone, tmp_path / "small.npz", 17)
    (tmp_path / "junk.npz").write_bytes(b"not a noise file")
    with pytest.raises(FlowError, match="not a noise file"):
        NoiseDump.load(tmp_path / "junk.npz")
    with pytest.raises(FlowError, match="not a backbone model"):
        load_for_training(tsb_path, tmp_path / "mine.npz", 5)
