"""Conductance drift: the power law per preset, cells' ages, and the chip's clock."""

import math

import numpy as np
import pytest

from nvcim.firmware_emu.contract.registers import DeviceModelCode
from nvcim.firmware_emu.contract.device import PRESETS
from nvcim.firmware_emu.contract.retention import Retention
from nvcim.firmware_emu.drift import CellAges

DAY = 86400


def _aged_plane(retention: Retention, seconds: int, seed: int = 7, programmed_at: int = 0):
    ages = CellAges((2, 256, 256))
    g = np.full((256, 256), 2.0, dtype=np.float32)
    ages.stamp(1, slice(0, 256), slice(0, 256), None, programmed_at)
    return ages, g, ages.conductance(g, 1, programmed_at + seconds, seed, retention, generation=1)


def test_mean_conductance_follows_the_power_law():
    r = Retention(0.05, 0.01)
    _, g, drifted = _aged_plane(r, DAY)
    # E[(1 + t/t0)^-nu] for nu ~ N(m, s^2) (clipping at 0 is 5 sigma away): exp(-m L + s^2 L^2 / 2)
    log_age = math.log1p(DAY / r.t0_s)
    expected = 2.0 * math.exp(-r.nu_mean * log_age + (r.nu_std * log_age) ** 2 / 2)
    assert drifted.mean() == pytest.approx(expected, rel=2e-3)
    # the spread over cells is that of nu: std of ln(g/g_prog) = nu_std * ln(1 + t/t0)
    assert np.log(drifted / g).std() == pytest.approx(r.nu_std * log_age, rel=0.02)


def test_no_time_no_change_and_no_drift_without_exponents():
    r = PRESETS[DeviceModelCode.RRAM4].retention
    ages, g, same = _aged_plane(r, 0, programmed_at=500)
    assert same is g
    _, g, kept = _aged_plane(PRESETS[DeviceModelCode.GAUSSIAN].retention, 10 * 365 * DAY)
    assert kept is g


def test_same_seed_same_drift_other_seed_other_drift():
    r = PRESETS[DeviceModelCode.FEFET6].retention
    _, _, a = _aged_plane(r, DAY, seed=3)
    _, _, b = _aged_plane(r, DAY, seed=3)
    _, _, c = _aged_plane(r, DAY, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_exponents_are_clipped_at_zero_so_no_cell_grows():
    r = Retention(0.005, 0.005)  # about 16 % of cells draw nu < 0
    _, g, drifted = _aged_plane(r, 365 * DAY)
    assert (drifted <= g).all()
    assert (drifted == g).mean() == pytest.approx(0.1587, abs=0.01)


def test_a_cell_programmed_later_drifts_from_its_own_stamp():
    r = Retention(0.05, 0.0)
    ages = CellAges((1, 4, 8))
    g = np.ones((4, 8), dtype=np.float32)
    ages.stamp(0, slice(0, 4), slice(0, 8), None, 0)
    ages.stamp(0, slice(1, 2), slice(0, 8), (np.arange(8) < 4)[None], 1000)  # half a row reprogrammed at t = 1000
    now = ages.conductance(g, 0, 1000, 0, r, generation=2)
    assert now[1, :4] == pytest.approx(1.0)
    assert now[0] == pytest.approx(np.full(8, (1 + 1000 / r.t0_s) ** -0.05))


def test_drifted_planes_are_cached_per_clock_and_read_only():
    r = Retention(0.02, 0.01)
    ages = CellAges((1, 8, 8))
    g = np.ones((8, 8), dtype=np.float32)
    ages.stamp(0, slice(0, 8), slice(0, 8), None, 0)
    first = ages.conductance(g, 0, 100, 0, r, generation=1)
    assert ages.conductance(g, 0, 100, 0, r, generation=1) is first
    assert ages.conductance(g, 0, 200, 0, r, generation=1) is not first
    assert ages.conductance(g, 0, 200, 0, r, generation=2) is not first
    with pytest.raises(ValueError):
        first[0, 0] = 0


def test_retention_refuses_negative_parameters():
    with pytest.raises(ValueError, match="nu_mean"):
        Retention(-0.01, 0.0)
    with pytest.raises(ValueError, match="t0_s"):
        Retention(0.01, 0.0, t0_s=0)


def test_every_preset_states_its_basis_and_only_gaussian_keeps_its_conductance():
    for code in DeviceModelCode:
        retention = PRESETS[code].retention
        assert retention.basis, code
        assert retention.drifts == (code != DeviceModelCode.GAUSSIAN), code
