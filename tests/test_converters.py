"""Finite DAC/ADC resolution: products formed tile by tile through each array's converters."""

import numpy as np
import pytest
import torch

from nvcim import driver
from zoo import SmallCNN, export


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    torch.manual_seed(0)
    return export(SmallCNN().eval(), tmp_path_factory.mktemp("cnn") / "cnn.onnx", (3, 8, 8), dynamo=False)


def _run(path, options: str, x: np.ndarray) -> np.ndarray:
    with driver.load(path, device=f"emu://?sigma=0.3&seed=2&rows=32&cols=64&{options}") as sess:
        assert len(sess.program.layers) == 4 and sum(len(layer.tiles) for layer in sess.program.layers) > 4
        tiled = sess.device.link.port.chip._converter_product() is not None
        assert tiled == ("bits=" in options and "bits=0" not in options)
        return sess.run(None, {"x": x})[0]


def test_fine_converters_reproduce_the_ideal_product_tile_by_tile(cnn_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    ideal = _run(cnn_path, "dac_bits=0&adc_bits=0", x)
    fine = _run(cnn_path, "dac_bits=16&adc_bits=24", x)
    assert np.abs(fine - ideal).max() < 1e-3 * np.abs(ideal).max()


def test_coarse_converters_cost_accuracy_and_are_deterministic(cnn_path):
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    ideal = _run(cnn_path, "", x)
    coarse = _run(cnn_path, "dac_bits=4&adc_bits=6", x)
    error = np.abs(coarse - ideal).max() / np.abs(ideal).max()
    assert 0.01 < error < 1.0
    assert np.array_equal(coarse, _run(cnn_path, "dac_bits=4&adc_bits=6", x))


def test_converters_are_set_per_array():
    with driver.open("emu://?arrays=4") as dev:
        dev.write_register("ARRAY_SELECT", 2)
        dev.write_register("ARRAY_CONVERTERS", 6 | 8 << 8)
        assert dev.read_register("ARRAY_CONVERTERS") == 6 | 8 << 8
        dev.write_register("ARRAY_SELECT", 1)
        assert dev.read_register("ARRAY_CONVERTERS") == 0
        with pytest.raises(driver.DeviceError, match="ARRAY_SELECT value 4 is not an array"):
            dev.write_register("ARRAY_SELECT", 4)
        with pytest.raises(driver.DeviceError, match="DAC_BITS must be 0..16"):
            dev.write_register("ARRAY_CONVERTERS", 17)
        assert dev.read_register("ARRAY_CONVERTERS") == 0


def test_one_coarse_array_changes_only_the_layers_it_holds(cnn_path):
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with driver.load(cnn_path, device="emu://?sigma=0&rows=32&cols=64") as sess:
        ideal = sess.run(None, {"x": x})[0]
        unused = 1 + max(t.array for layer in sess.program.layers for t in layer.tiles)
        sess.device.write_register("ARRAY_SELECT", unused)
        sess.device.write_register("ARRAY_CONVERTERS", 2 | 2 << 8)
        assert np.array_equal(sess.run(None, {"x": x})[0], ideal)   # no tile there: fast path, same bits
        sess.device.write_register("ARRAY_SELECT", sess.program.layers[-1].tiles[0].array)
        sess.device.write_register("ARRAY_CONVERTERS", 3 | 3 << 8)
        assert not np.allclose(sess.run(None, {"x": x})[0], ideal, atol=1e-3)
