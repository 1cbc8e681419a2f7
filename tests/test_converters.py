"""Finite DAC/ADC resolution: products formed tile by tile through each array's converters."""

import numpy as np
import pytest

from nvcim import driver
from nvcim.firmware_emu.contract import ops
from nvcim.firmware_emu.contract.program_format import Instr, Opcode
from nvcim.firmware_emu.converters import Windows


def _run(path, x: np.ndarray, dac_bits: int | None = None, adc_bits: int | None = None) -> np.ndarray:
    """Outputs on a noisy chip of small arrays; converter bits as given (None: the URL leaves them out)."""
    options = "".join(f"&{k}={v}" for k, v in (("dac_bits", dac_bits), ("adc_bits", adc_bits)) if v is not None)
    with driver.load(path, device=f"emu://?sigma=0.3&seed=2&rows=32&cols=64{options}") as sess:
        assert len(sess.program.layers) == 4 and sum(len(layer.tiles) for layer in sess.program.layers) > 4
        for array in {t.array for layer in sess.program.layers for t in layer.tiles}:
            sess.device.write_register("ARRAY_SELECT", array)
            assert sess.device.read_register("ARRAY_CONVERTERS") == (dac_bits or 0) | (adc_bits or 0) << 8
        return sess.run(None, {"x": x})[0]


def test_fine_converters_reproduce_the_ideal_product_tile_by_tile(cnn_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    ideal = _run(cnn_path, x, dac_bits=0, adc_bits=0)
    assert np.array_equal(ideal, _run(cnn_path, x))  # 0 bits: no converters, the same product as the default
    fine = _run(cnn_path, x, dac_bits=16, adc_bits=24)
    assert not np.array_equal(fine, ideal)  # formed tile by tile through the converters...
    assert np.abs(fine - ideal).max() < 1e-3 * np.abs(ideal).max()  # ...which are fine enough not to matter


def test_coarse_converters_cost_accuracy_and_are_deterministic(cnn_path):
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    ideal = _run(cnn_path, x)
    coarse = _run(cnn_path, x, dac_bits=4, adc_bits=6)
    error = np.abs(coarse - ideal).max() / np.abs(ideal).max()
    assert 0.01 < error < 1.0
    assert np.array_equal(coarse, _run(cnn_path, x, dac_bits=4, adc_bits=6))


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


@pytest.mark.parametrize("shape, kernel, strides, dilations, pads, group", [
    ((3, 4, 11), [3], [2], [1], [1, 2], 2),
    ((2, 6, 9, 8), [3, 2], [1, 2], [2, 1], [1, 0, 2, 1], 3),
    ((2, 2, 5, 4, 6), [2, 3, 2], [1, 1, 2], [1, 1, 1], [0, 1, 1, 1, 0, 0], 1),
])
def test_windows_give_every_chunk_the_columns_of_an_explicit_im2col(shape, kernel, strides, dilations, pads, group):
    """A converter product copies a CONV's windows chunk by chunk, transposed (the batch along the
    last axis); any chunk starting at an output line must be exactly those rows of the im2col matrix,
    written here window by window, as columns."""
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    ins = Instr(Opcode.CONV, "conv", [0], [1], 0, dict(kernel=kernel, strides=strides, dilations=dilations,
                                                        pads=pads, group=[group]))
    nd = len(kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    spatial = [(padded.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    c = shape[1] // group
    for g in range(group):
        want = []
        for n in range(shape[0]):
            for pos in np.ndindex(*spatial):
                window = padded[(n, slice(g * c, (g + 1) * c)) + tuple(
                    slice(p * s, p * s + (k - 1) * d + 1, d) for p, s, k, d in zip(pos, strides, kernel, dilations))]
                want.append(window.reshape(-1))
        want = np.array(want)
        windows = Windows(ops.windows(ins, x)).group(g, group)
        assert windows.shape == want.shape and windows.spatial == tuple(spatial)
        unit, total = windows.unit, want.shape[0]
        for a, b in [(0, total), (0, unit), (unit, total), (2 * unit, total - unit), (0, total - unit)]:
            got = windows.columns(a, b, want.shape[1] + 3)               # transposed, 3 zero rows below
            assert np.array_equal(got[:-3], want[a:b].T) and not got[-3:].any(), (g, a, b)


def test_chunks_that_cut_images_write_every_output_plane_once(cnn_path, monkeypatch):
    """A CONV's batch is cut into chunks at output lines, so a chunk may hold part of an image,
    whole images, then part of another: each writes its rows into the right planes."""
    from nvcim.firmware_emu import converters

    x = np.random.default_rng(4).standard_normal((12, 3, 8, 8)).astype(np.float32)
    with driver.load(cnn_path, device="emu://?sigma=0.3&seed=2&rows=32&cols=64&dac_bits=0&adc_bits=24") as sess:
        whole = sess.run(None, {"x": x})[0]
        # 12 images of 8 x 8 positions in 8 chunks of 96 rows: [0, 96) is image 0 and half of
        # image 1, [96, 192) the other half and image 2, ...
        monkeypatch.setattr(converters, "CHUNK_SUMS", 1)
        monkeypatch.setattr(converters, "MIN_ROWS", 100)
        cut = sess.run(None, {"x": x})[0]
    assert np.allclose(cut, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
