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
