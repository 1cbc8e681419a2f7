"""Conductance drift: the power law per preset, cells' ages, and the chip's clock."""

import math

import numpy as np
import pytest

from nvcim.firmware_emu.contract.device import PRESETS
from nvcim.firmware_emu.contract.registers import DeviceModelCode
from nvcim.firmware_emu.contract.retention import Retention
from nvcim.firmware_emu.drift import Aging, CellAges

DAY = 86400


def _aged_plane(retention: Retention, seconds: int, seed: int = 7, programmed_at: int = 0):
    ages = CellAges((2, 256, 256))
    g = np.full((256, 256), 2.0, dtype=np.float32)
    ages.stamp(1, slice(0, 256), slice(0, 256), None, programmed_at)
    return ages, g, ages.conductance(g, 1, Aging(programmed_at + seconds, seed, retention), 1)


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
    now = ages.conductance(g, 0, Aging(1000, 0, r), 2)
    assert now[1, :4] == pytest.approx(1.0)
    assert now[0] == pytest.approx(np.full(8, (1 + 1000 / r.t0_s) ** -0.05))


def test_drifted_planes_are_cached_per_clock_and_read_only():
    r = Retention(0.02, 0.01)
    ages = CellAges((1, 8, 8))
    g = np.ones((8, 8), dtype=np.float32)
    ages.stamp(0, slice(0, 8), slice(0, 8), None, 0)
    first = ages.conductance(g, 0, Aging(100, 0, r), 1)
    assert ages.conductance(g, 0, Aging(100, 0, r), 1) is first
    assert ages.conductance(g, 0, Aging(200, 0, r), 1) is not first
    assert ages.conductance(g, 0, Aging(200, 0, r), 2) is not first
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


# -- on the chip: the clock, reads and runs after time, persistence ------------------------------------------
from nvcim import driver  # noqa: E402
from nvcim.driver import CellQuantity, DeviceError, InvalidArgument  # noqa: E402

YEAR = 365 * DAY


def _expected_mean_factor(retention: Retention, seconds: float) -> float:
    """E[(1 + t/t0)^-nu] for nu = max(N(mean, std^2), 0), by quadrature over the normal (independent of the chip)."""
    z = np.linspace(-8, 8, 200001)
    weight = np.exp(-z * z / 2)
    nu = np.maximum(retention.nu_mean + retention.nu_std * z, 0)
    return float((weight * (1 + seconds / retention.t0_s) ** -nu).sum() / weight.sum())


@pytest.mark.parametrize("model", ["RRAM4", "FEFET6"])
def test_conductance_read_later_follows_the_presets_power_law(model):
    targets = np.full((256, 256), 3, np.uint8)
    retention = PRESETS[DeviceModelCode[model]].retention
    with driver.open(f"emu://?sigma=0&seed=21&model={model}") as dev:
        dev.write_cells(0, 0, 0, targets)
        assert np.array_equal(dev.read_cells(0, 0, 0, 256, 256), targets.astype(np.float32))  # no time, no change
        for seconds in (DAY, 10 * YEAR):
            dev.advance_time(seconds - dev.clock)
            ratio = dev.read_cells(0, 0, 0, 256, 256) / 3
            assert ratio.mean() == pytest.approx(_expected_mean_factor(retention, seconds), abs=1e-3)
            assert (ratio <= 1).all()
        assert np.array_equal(dev.read_cells(0, 0, 0, 256, 256, CellQuantity.TARGET), targets)
        assert not dev.read_cells(0, 0, 0, 256, 256, CellQuantity.NOISE).any()  # the capture is the programming's


def test_same_seed_same_drift_and_gaussian_keeps_its_cells():
    targets = np.random.default_rng(0).integers(0, 4, (64, 256)).astype(np.uint8)
    reads = {}
    for key, url in (("a", "emu://?seed=5&model=RRAM4"), ("b", "emu://?seed=5&model=RRAM4"),
                     ("c", "emu://?seed=6&model=RRAM4"), ("g", "emu://?seed=5")):
        with driver.open(url) as dev:
            dev.write_cells(0, 0, 0, targets)
            before = dev.read_cells(0, 0, 0, 64, 256)
            dev.advance_time(YEAR)
            reads[key] = (before, dev.read_cells(0, 0, 0, 64, 256))
    assert np.array_equal(reads["a"][1], reads["b"][1])
    assert not np.array_equal(reads["a"][1], reads["a"][0])
    assert not np.array_equal(reads["a"][1] / reads["a"][0], reads["c"][1] / reads["c"][0])
    assert np.array_equal(reads["g"][0], reads["g"][1])  # GAUSSIAN: no drift at any time


def test_the_clock_only_moves_forward_survives_reset_and_power_cycles(tmp_path):
    url = f"emu://?image={tmp_path / 'chip'}&model=FEFET2&sigma=0"
    month = 30 * DAY
    with driver.open(url) as dev:
        assert dev.clock == 0
        dev.write_cells(0, 0, 0, np.full((128, 256), 2, np.uint8))
        assert dev.advance_time(month) == month
        with pytest.raises(DeviceError, match="only moves forward"):
            dev.write_register("CLOCK", 10)
        with pytest.raises(InvalidArgument):
            dev.advance_time(-1)
        dev.reset()
        assert dev.clock == month
        dev.write_cells(0, 64, 0, np.full((64, 256), 2, np.uint8))  # rows 64.. reprogrammed a month later
        dev.advance_time(DAY)
        aged = dev.read_cells(0, 0, 0, 128, 256)
    with driver.open(url) as dev:
        assert dev.clock == month + DAY
        stamps = dev.read_cells(0, 0, 0, 128, 256, CellQuantity.PROGRAM_TIME)
        assert (stamps[:64] == 0).all() and (stamps[64:] == month).all()
        assert np.array_equal(dev.read_cells(0, 0, 0, 128, 256), aged)
    retention = PRESETS[DeviceModelCode.FEFET2].retention
    for rows, age in ((slice(0, 64), month + DAY), (slice(64, 128), DAY)):  # each drifted from its own programming
        assert aged[rows].mean() / 2 == pytest.approx(_expected_mean_factor(retention, age), abs=0.003)


def _mlp(tmp_path):
    from zoo import export_mlp

    path = export_mlp(tmp_path / "mlp.onnx", in_features=64, hidden=64, out=10)
    x = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    return path, x


def test_inference_sees_drift_and_write_verify_after_drift_restores(tmp_path):
    path, x = _mlp(tmp_path)
    url = "emu://?seed=3&model=FEFET6&sigma=0.3"
    with driver.load(path, url, policy="write-verify") as session:
        name = session.get_inputs()[0].name
        fresh = session.run(None, {name: x})[0]
        dev = session.device
        dev.advance_time(10 * YEAR)
        aged = session.run(None, {name: x})[0]
        assert np.array_equal(session.run(None, {name: x})[0], aged)  # the same clock, the same outputs
        # outputs shrink with the conductances (about 0.7 of their size after ten years on FeFET)
        shrink = np.abs(aged).mean() / np.abs(fresh).mean()
        assert 0.5 < shrink < 0.9
        driver.deploy(dev, session.program, verify=True)  # reprogrammed at the later clock: drift restarts
        restored = session.run(None, {name: x})[0]
    # back within write-verify's own noise of the fresh outputs: a small part of what ten years moved them
    assert np.abs(restored - fresh).mean() < 0.3 * np.abs(aged - fresh).mean()


# -- tools: the noise dump's time, evaluation after a given age ----------------------------------------------
def test_noise_dump_records_the_clock_and_each_tiles_programming_time(tmp_path):
    from nvcim.tools.chip import NoiseDump, deploy_backbone, fetch_noise

    from zoo import export_mlp

    path = export_mlp(tmp_path / "mlp.onnx", in_features=64, hidden=64, out=10)
    with driver.open("emu://?seed=4&model=RRAM4") as dev:
        dev.advance_time(1000)
        deploy_backbone(dev, path)
        captured = fetch_noise(dev, path)
        dev.advance_time(DAY)
        later = fetch_noise(dev, path)
    assert captured.clock == 1000 and later.clock == 1000 + DAY
    assert later.programmed_at.keys() == later.cells.keys()
    assert all((t == 1000).all() for tiles in later.programmed_at.values() for t in tiles)
    assert later.digest() == captured.digest()  # the dump is the programming's capture, drift or not
    loaded = NoiseDump.load(later.save(tmp_path / "noise.npz"))
    assert loaded.clock == later.clock
    assert all(np.array_equal(a, b) for layer in later.programmed_at
               for a, b in zip(loaded.programmed_at[layer], later.programmed_at[layer]))


def test_eval_after_an_age_on_a_chip_image(tmp_path):
    from click.testing import CliRunner

    from nvcim.tools.cli import main

    runner = CliRunner()
    chip, bb = f"emu://?image={tmp_path / 'chip'}&model=FEFET6", tmp_path / "backbone.onnx"
    for args in (["train", "--epochs", 1, "--stop-fraction", 1, "-o", bb], ["deploy", bb, "--device", chip]):
        assert runner.invoke(main, [str(a) for a in args]).exit_code == 0
    out = runner.invoke(main, ["eval", str(bb), "--device", chip, "--draws", "0", "--age", "10y"]).output
    assert "10y later: clock 315360000 s" in out, out
    bad = runner.invoke(main, ["eval", str(bb), "--device", chip, "--draws", "0", "--age", "ten years"])
    assert bad.exit_code != 0 and "age 'ten years'" in bad.output
    with driver.open(chip) as dev:
        assert dev.clock == 10 * YEAR  # the image keeps the later clock
