"""State-dependent presets per weight magnitude (U-SWIM's model) and per cell state.

The references here are written from the model's statement, not from the chip's code:
a weight's level is sum_j t_j 4^j over its S = 4 cells (K = 2), the band is
0.25 < level / 255 < 0.75, sigma' = sigma / sqrt(0.4 s^2 + 0.6), and a weight whose S
cells all have std r * g_max errs by scale * g_max * r * sqrt(1 + 16 + 256 + 4096).
"""

import math

import numpy as np
import pytest

from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.firmware_emu.contract.variation import VariationMode, region_levels

S, K = 4, 2
PLACE_NORM = math.sqrt(1 + 16 + 256 + 4096)  # sqrt(sum_j 4^(jK)) = 66.10


def _digits(levels: np.ndarray) -> np.ndarray:
    """Cell states of each level, slice j = bits [2j, 2j + 2): shape (..., S)."""
    return np.stack([(levels >> (K * j)) & 3 for j in range(S)], axis=-1).astype(np.uint8)


def test_region_levels_groups_the_s_columns_of_each_weight():
    rng = np.random.default_rng(0)
    stored_levels = rng.integers(0, 256, (6, 8))                 # 8 weights a row, 32 columns
    stored = _digits(stored_levels).reshape(6, 32)
    new_levels = rng.integers(0, 256, (3, 8))
    new = _digits(new_levels).reshape(3, 32)[:, 6:27]            # a region cutting weights 1 and 6
    got = region_levels(stored, 2, 6, new, S, K)
    expected = stored_levels[2:5].copy()
    expected[:, 2:6] = new_levels[:, 2:6]                        # wholly rewritten weights
    # weights 1 and 6 are mixed: the region's cells where it covers them, the stored cells elsewhere
    for w, inside in ((1, [2, 3]), (6, [0, 1, 2])):
        mixed = _digits(stored_levels[2:5, w])
        mixed[:, inside] = _digits(new_levels[:, w])[:, inside]
        expected[:, w] = (mixed.astype(int) * 4 ** np.arange(S)).sum(1)
    per_column = np.repeat(expected, S, axis=1)[:, 6:27]
    assert np.array_equal(got, per_column)


def test_region_levels_on_an_array_narrower_than_its_last_group():
    stored = np.zeros((1, 6), np.uint8)  # 6 columns: one full group, then half of one
    got = region_levels(stored, 0, 4, np.array([[1, 2]], np.uint8), S, K)
    assert got.tolist() == [[1 + 2 * 4] * 2]


@pytest.mark.parametrize("model,s", [("RRAM1", 1.0), ("FEFET2", 2.0), ("RRAM4", 4.0), ("FEFET6", 6.0)])
def test_weight_rule_gives_every_cell_of_a_weight_its_band_sigma(model, s):
    device = DeviceSettings(0.3, model)
    levels = np.arange(256)
    base = 0.3 / math.sqrt(0.4 * s * s + 0.6)
    expected = np.where((levels / 255 > 0.25) & (levels / 255 < 0.75), s * base, base)
    if model == "FEFET2":
        expected[0] = 0.01
    assert device.weight_sigma(levels) == pytest.approx(expected.astype(np.float32))
    assert levels[(levels / 255 > 0.25) & (levels / 255 < 0.75)].tolist() == list(range(64, 192))


def test_cell_state_rule_is_still_available():
    device = DeviceSettings(0.3, "RRAM4", variation=VariationMode.CELL_STATE)
    base = 0.3 / math.sqrt(0.4 * 16 + 0.6)
    states = np.array([0, 1, 2, 3])
    assert device.cell_sigmas(states) == pytest.approx([base, 4 * base, 4 * base, base])
    by_weight = DeviceSettings(0.3, "RRAM4")
    with pytest.raises(ValueError, match="level"):
        by_weight.cell_sigmas(states)
    assert DeviceSettings(0.3).cell_sigmas(states) == 0.3  # a uniform device needs no lookup


# -- on the chip: program weights cell by cell, read the captured noise back per weight ------------------------
from nvcim import driver  # noqa: E402
from nvcim.firmware_emu.contract.protocol import CellQuantity  # noqa: E402

BAND = range(64, 192)  # 0.25 < level / 255 < 0.75


def _levels_with_band_share(n: int, share: float, seed: int = 0) -> np.ndarray:
    """n non-zero levels, ``share`` of them in the band, the rest spread over 1..63 and 192..255."""
    rng = np.random.default_rng(seed)
    inside = rng.integers(64, 192, int(round(n * share)))
    outside = rng.choice(np.r_[1:64, 192:256], n - inside.size)
    return rng.permutation(np.r_[inside, outside])


def _weight_noise_on_chip(levels: np.ndarray, url: str) -> np.ndarray:
    """Program ``levels`` (arrays x 256 x 64 weights) open loop and return each weight's error
    sum_j dg_j 4^j / 255, i.e. in units of max|W| (scale = max|W| / 255)."""
    levels = levels.reshape(-1, 256, 64)
    with driver.open(url) as dev:
        noise = []
        for a, block in enumerate(levels):
            dev.write_cells(a, 0, 0, _digits(block).reshape(256, 256))
            noise.append(dev.read_cells(a, 0, 0, 256, 256, CellQuantity.NOISE).reshape(256, 64, S))
    return (np.stack(noise).astype(np.float64) @ (4.0 ** np.arange(S))).ravel() / 255


def test_rram4_per_weight_noise_follows_the_weight_magnitude_band():
    sigma, s = 0.3, 4.0
    levels = _levels_with_band_share(4 * 256 * 64, 0.4)
    err = _weight_noise_on_chip(levels, f"emu://?sigma={sigma}&seed=11&model=RRAM4&arrays=4")
    base = sigma / math.sqrt(0.4 * s * s + 0.6)
    unit = 3 * PLACE_NORM / 255  # 0.7776: per-weight std / (cell sigma * max|W|)
    inside = np.isin(levels, BAND)
    assert err[inside].std() / (unit * s * base) == pytest.approx(1, abs=0.02)   # 1.1756 sigma max|W|
    assert err[~inside].std() / (unit * base) == pytest.approx(1, abs=0.02)      # 0.2939 sigma max|W|
    # 40 % in the band, as the rescaling assumes: overall the uniform device's 0.7776 sigma max|W|
    assert np.sqrt((err ** 2).mean()) / sigma == pytest.approx(unit, rel=0.02)
    assert unit == pytest.approx(0.7776, abs=1e-4)


def test_per_cell_state_rule_on_request_widens_middle_digits_not_weights():
    # level 40 = cells (0, 2, 2, 0): outside the band as a weight, two middle states as cells
    levels = np.full(256 * 64, 40)
    sigma, s = 0.3, 4.0
    base = sigma / math.sqrt(0.4 * s * s + 0.6)
    for variation, widened in (("weight", []), ("cell", [1, 2])):
        with driver.open(f"emu://?sigma={sigma}&seed=12&model=RRAM4&variation={variation}") as dev:
            dev.write_cells(0, 0, 0, _digits(levels.reshape(256, 64)).reshape(256, 256))
            cells = dev.read_cells(0, 0, 0, 256, 256, CellQuantity.NOISE).reshape(-1, S) / 3
            assert dev.read_register("CONFIG") == (2 if variation == "cell" else 0)
        for j in range(S):
            want = s * base if j in widened else base
            assert cells[:, j].std() / want == pytest.approx(1, abs=0.03), (variation, j)


def test_fefet2_quiet_state_is_the_zero_weight():
    sigma, s = 0.3, 2.0
    base = sigma / math.sqrt(0.4 * s * s + 0.6)
    levels = np.r_[np.zeros(128 * 64, int), np.full(128 * 64, 100), ].reshape(256, 64)  # level 0 pulsed, and in band
    with driver.open(f"emu://?sigma={sigma}&seed=13&model=FEFET2") as dev:
        dev.write_cells(0, 0, 0, _digits(levels).reshape(256, 256))
        cells = dev.read_cells(0, 0, 0, 256, 256, CellQuantity.NOISE).reshape(256, 64, S) / 3
    assert cells[:128].std() / 0.01 == pytest.approx(1, abs=0.03)
    assert cells[128:].std() / (s * base) == pytest.approx(1, abs=0.03)  # every digit of level 100, state 0 too


def test_gaussian_cells_do_not_depend_on_the_variation_rule():
    levels = _levels_with_band_share(256 * 64, 0.5)
    a = _weight_noise_on_chip(levels, "emu://?sigma=0.3&seed=14&variation=weight")
    b = _weight_noise_on_chip(levels, "emu://?sigma=0.3&seed=14&variation=cell")
    assert np.array_equal(a, b)


def test_the_chip_refuses_a_tile_that_splits_a_column_group(tmp_path):
    from nvcim.compiler import compile_model

    from zoo import export_mlp

    path = export_mlp(tmp_path / "mlp.onnx", in_features=16, hidden=8, out=4)
    with driver.open("emu://") as dev:
        program = compile_model(path, dev.identity.geometry)
        assert all(t.col % S == 0 for layer in program.layers for t in layer.tiles)  # the compiler's placement
        program.layers[0].tiles[0].col = 2
        with pytest.raises(driver.DeviceError, match="not at a multiple of 4"):
            dev.load_code(program)
