"""Measured cell statistics on the emulated chip match the device model of docs/device-model.md."""

import math

import numpy as np
import pytest

from nvcim import driver
from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.firmware_emu.contract.protocol import CellQuantity
from nvcim.firmware_emu.contract.registers import DeviceModelCode
from nvcim.firmware_emu.physics import READ_PULSE_NS, WRITE_PULSE_NS

G_MAX = 3.0


def _program(url: str, targets: np.ndarray, verify: bool = False, mask=None):
    with driver.open(url) as dev:
        stats = dev.write_cells(0, 0, 0, targets, verify=verify, mask=mask)
        g = dev.read_cells(0, 0, 0, *targets.shape)
        counters = dev.counters()
    return g, stats, counters


def _states(rows: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, (rows, 256)).astype(np.uint8)


def test_gaussian_open_loop_std_is_sigma_of_g_max():
    t = _states()
    g, _, _ = _program("emu://?sigma=0.2&seed=1", t)
    assert abs((g - t).std() / G_MAX / 0.2 - 1) < 0.02


@pytest.mark.parametrize("model,s", [("RRAM1", 1), ("RRAM4", 4), ("FEFET6", 6)])
def test_state_dependent_presets_scale_the_middle_states(model, s):
    t = _states()
    g, _, _ = _program(f"emu://?sigma=0.3&seed=2&model={model}&variation=cell", t)  # the per-cell-state rule
    base = 0.3 / np.sqrt(0.4 * s * s + 0.6)
    err = (g - t) / G_MAX
    middle = (t == 1) | (t == 2)  # levels 1/3 and 2/3 of g_max lie in (0.25, 0.75)
    assert abs(err[middle].std() / (s * base) - 1) < 0.03
    assert abs(err[~middle].std() / base - 1) < 0.03


def test_fefet2_state_zero_barely_moves():
    t = _states()
    g, _, _ = _program("emu://?sigma=0.3&seed=3&model=FEFET2&variation=cell", t)
    err = (g - t) / G_MAX
    assert abs(err[t == 0].std() / 0.01 - 1) < 0.05
    assert err[(t == 1) | (t == 2)].std() > 0.3


def test_write_verify_defaults_give_sigma_003_in_a_few_pulses():
    t = _states(512)
    g, stats, counters = _program("emu://?sigma=0.3&seed=4&rows=512", t, verify=True)
    assert abs((g - t).std() / G_MAX - 0.03) < 0.003
    assert stats.verify_failures == 0
    assert 1.9 < stats.write_pulses / t.size < 2.4
    assert counters["verify_iters"] == stats.write_pulses - t.size
    reads = stats.read_pulses + t.size  # verify reads, then the test's own read-back
    assert counters["busy_ns"] == stats.write_pulses * WRITE_PULSE_NS + reads * READ_PULSE_NS


def test_selective_verify_touches_no_other_cell():
    with driver.open("emu://?sigma=0.3&seed=5&arrays=4") as dev:
        for a in range(4):
            dev.write_cells(a, 0, 0, _states(seed=a))
        before = np.stack([dev.read_cells(a, 0, 0, 256, 256) for a in range(4)])
        noise_before = np.stack([dev.read_cells(a, 0, 0, 256, 256, CellQuantity.NOISE) for a in range(4)])
        mask = np.zeros((100, 60), bool)
        mask[::7, ::3] = True
        stats = dev.write_cells(2, 30, 40, _states(100, seed=9)[:, :60], verify=True, mask=mask)
        after = np.stack([dev.read_cells(a, 0, 0, 256, 256) for a in range(4)])
        noise_after = np.stack([dev.read_cells(a, 0, 0, 256, 256, CellQuantity.NOISE) for a in range(4)])
    assert stats.cells == mask.sum()
    touched = np.zeros(before.shape, bool)
    touched[2, 30:130, 40:100] = mask
    assert np.array_equal(before[~touched], after[~touched])          # bit-identical
    assert np.array_equal(noise_before[~touched], noise_after[~touched])
    assert not np.array_equal(before[touched], after[touched])
    assert np.abs(after[touched] - _states(100, seed=9)[:, :60][mask]).max() <= 0.06 * G_MAX


def test_clip_keeps_conductance_in_range():
    t = _states()
    g, _, _ = _program("emu://?sigma=0.4&seed=6&clip=1", t)
    assert g.min() == 0 and g.max() == G_MAX
    g, _, _ = _program("emu://?sigma=0.4&seed=6", t)
    assert g.min() < 0 and g.max() > G_MAX


def test_stuck_cells_are_fixed_by_the_seed_and_fail_verify():
    t = _states()
    g1, stats, _ = _program("emu://?sigma=0.3&seed=7&stuck_rate=0.1", t, verify=True)
    g2, _, _ = _program("emu://?sigma=0.3&seed=7&stuck_rate=0.1", np.full_like(t, 1), verify=True)
    stuck1 = (g1 == 0) | (g1 == G_MAX)
    stuck2 = (g2 == 0) | (g2 == G_MAX)
    assert abs(stuck2.mean() - 0.1) < 0.01
    assert np.array_equal(stuck1 & stuck2, stuck2)  # same map: every cell stuck for target 1 is stuck again
    wrong = stuck2 & (np.abs(g1 - t) > 0.06 * G_MAX)
    assert stats.verify_failures == wrong.sum() > 0


def test_read_noise_changes_every_read_but_not_the_cell():
    t = _states(16)
    with driver.open("emu://?sigma=0&read_noise=0.05&seed=8") as dev:
        dev.write_cells(0, 0, 0, t)
        a, b = dev.read_cells(0, 0, 0, 16, 256), dev.read_cells(0, 0, 0, 16, 256)
    assert not np.array_equal(a, b)
    assert abs((a - t).std() / G_MAX - 0.05) < 0.005


def test_preset_sigmas_per_state_follow_the_datasheet():
    """docs/device-model.md: sigma' = sigma / sqrt(0.4 s^2 + 0.6); states in (0.25, 0.75) g_max get s * sigma'."""
    fefet2 = DeviceSettings(0.3, "FEFET2").state_sigmas()
    base = 0.3 / math.sqrt(2.2)
    assert fefet2 == pytest.approx((0.01, 2 * base, 2 * base, base))  # state 0 barely moves
    rram4 = DeviceSettings(0.3, DeviceModelCode.RRAM4, cell_bits=4).state_sigmas()
    base = 0.3 / math.sqrt(7.0)
    assert rram4 == pytest.approx([4 * base if 4 <= t <= 11 else base for t in range(16)])  # 4/15 .. 11/15
    assert DeviceSettings(0.2).state_sigmas() == (0.2,) * 4
