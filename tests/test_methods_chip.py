"""Every deployment method end to end on an emulated chip (LeNet-3 / digits, a short backbone).

What users rely on: each method's accuracy is the chip's own, its pulses include every
stage (the open-loop deploy too), it writes only the cells it says it writes, and the
verified share is what it reports.
"""

from __future__ import annotations

import numpy as np
import pytest

from nvcim import driver
from nvcim.firmware_emu.contract.protocol import CellQuantity
from nvcim.tools import datasets
from nvcim.tools.chip import FlowError, deploy_backbone, fetch_noise, program_on_chip
from nvcim.tools.methods import run_method
from nvcim.tools.onnx_io import export
from nvcim.tools.outcome import ChipSpec
from nvcim.tools.train import TrainConfig, train_backbone

CHIP = ChipSpec(0.3, 5)


@pytest.fixture(scope="module")
def data() -> datasets.Split:
    d = datasets.load("digits", image_size=28)
    return datasets.Split(d.x_train[:600], d.y_train[:600], d.x_test[:200], d.y_test[:200], "digits")


@pytest.fixture(scope="module")
def backbone(data, tmp_path_factory):
    cfg = TrainConfig(epochs=3, stop_fraction=None, val_draws=2)
    model = train_backbone(data, cfg, log=lambda s: None, progress=False).model
    return export(model, tmp_path_factory.mktemp("bb") / "backbone.onnx", role="backbone")


def _open_loop_pulses(backbone) -> int:
    with driver.open(CHIP.url()) as dev:
        return deploy_backbone(dev, backbone)[1].write_pulses


def test_deployed_and_write_verify_count_every_pulse(data, backbone):
    deployed = run_method("deployed", backbone, CHIP, data)
    assert deployed.write_pulses == deployed.stages["deploy"].cells > 0  # one pulse a cell
    assert deployed.verified_weights == 0 and deployed.total_weights == 45 + 450 + 4900
    full = run_method("write-verify", backbone, CHIP, data)
    assert full.verified_fraction == 1.0
    assert full.write_pulses > 1.5 * deployed.write_pulses  # the corrective pulses are counted
    assert abs(full.accuracy - full.ideal) <= 0.03 < deployed.gap  # verified cells hold the weights


def test_retrain_reflashes_only_its_layers_and_counts_the_deploy(data, backbone, tmp_path):
    last = run_method("retrain-last", backbone, CHIP, data, workdir=tmp_path, epochs=1)
    assert last.params["layers"] == ["fc.weight"] and last.verified_weights == 4900
    assert set(last.stages) == {"deploy", "reflash"}
    assert last.stages["deploy"].write_pulses == _open_loop_pulses(backbone)
    assert last.write_pulses == last.stages["deploy"].write_pulses + last.stages["reflash"].write_pulses
    layers = run_method("retrain-last-layers", backbone, CHIP, data, epochs=1)
    assert layers.params["layers"] == ["conv2.weight", "fc.weight"] and layers.verified_weights == 450 + 4900
    assert last.train_seconds > 0
    open_loop = run_method("retrain-last", backbone, CHIP, data, epochs=1, verify=False)
    reflash = open_loop.stages["reflash"]
    assert open_loop.verified_weights == 0 and reflash.write_pulses == reflash.cells > 0  # one pulse a cell

    # the conv layers' cells stay exactly as the open-loop deploy left them
    from nvcim.tools.baselines import RetrainConfig, reflash_layers, retrained_model
    with driver.open(CHIP.url()) as dev:
        program, _ = deploy_backbone(dev, backbone)
        dump = fetch_noise(dev, backbone)
        convs = [layer for layer in program.layers if dump.layers[layer.name] != "fc.weight"]
        s = program.slices

        def cells():
            return [dev.read_cells(t.array, t.row, t.col, t.in_count, t.out_count * s, q)
                    for layer in convs for t in layer.tiles for q in (CellQuantity.TARGET, CellQuantity.NOISE)]
        before = cells()
        path, names, _ = retrained_model(backbone, dump, "last", data, RetrainConfig(epochs=1), tmp_path / "r.onnx")
        new_program, cost, written = reflash_layers(dev, path, dump, names)
        assert all(np.array_equal(a, b) for a, b in zip(before, cells()))
        assert written == 4900 and cost.write_pulses > cost.cells  # written with write-verify
        held = {layer.name for layer in program_on_chip(dev).layers}
        assert {layer.name for layer in new_program.layers} <= held


def test_selective_verifies_exactly_the_chosen_weights(data, backbone):
    from nvcim.tools.evaluate import quantized_params
    from nvcim.tools.onnx_io import load_deploy
    from nvcim.tools.selective import scores, select, verify_masks

    model, _ = load_deploy(backbone)
    chosen = select(scores(model, "magnitude"), 0.1)
    assert sum(int(m.sum()) for m in chosen.values()) == round(0.1 * 5395)
    with driver.open(CHIP.url()) as dev:
        from nvcim.tools.chip import compile_for
        program = compile_for(dev, backbone)
        driver.deploy(dev, program, verify_mask=verify_masks(backbone, chosen))
        noise = fetch_noise(dev, backbone).noise
    wq = quantized_params(model)
    for name, mask in chosen.items():
        scale = float(wq[name].abs().max()) / 255
        err = np.abs(noise[name]) / scale            # weight error in units of one level
        pulsed = (wq[name].numpy() != 0)
        # a verified weight's four cells each end within the tolerance (0.06 g_max = 0.18 states): <= 0.18 * 85
        assert err[mask & pulsed].max() <= 0.18 * 85 + 1e-3
        assert err[~mask & pulsed].max() > 0.18 * 85   # open-loop weights are not held to it
    uswim = run_method("selective", backbone, CHIP, data, rule="uswim", budget=0.1)
    assert uswim.verified_weights == round(0.1 * 5395) and uswim.params == {"rule": "uswim", "budget": 0.1}
    assert _open_loop_pulses(backbone) < uswim.write_pulses < run_method("write-verify", backbone, CHIP,
                                                                          data).write_pulses
    with pytest.raises(FlowError, match="budget"):
        select(scores(model, "random"), 1.5)


def test_tsb_common_separate_and_insertion_points(data, backbone):
    common = run_method("tsb", backbone, CHIP, data, epochs=1)
    assert common.verified_weights == 25 and common.stages["reflash"].write_pulses < 400
    assert common.write_pulses == _open_loop_pulses(backbone) + common.stages["reflash"].write_pulses
    separate = run_method("tsb", backbone, CHIP, data, epochs=1, shared="separate")
    assert separate.verified_weights == 2 * 25  # one copy per insertion point
    one_point = run_method("tsb", backbone, CHIP, data, epochs=1, points=[1])
    assert one_point.params["points"] == [1] and one_point.accuracy != common.accuracy
    with pytest.raises(FlowError, match="insertion points"):
        run_method("tsb", backbone, CHIP, data, epochs=1, points=[2])
