"""The analog datapath of one layer: converters and read noise against a per-tile reference.

Both readouts: one ADC per bit line (the S slice columns of a weight each converted, then
shifted and added digitally) and analog shift-add (the S slice currents of a weight
summed with gains 2^(jK) before one ADC per weight column).

The reference below is written from the model's statement (docs/device-model.md#dac-and-adc),
one tile at a time in float64 with plain loops; the code under test stacks all tiles into
one batched float32 product. They must agree to float rounding (a rare element may land
one ADC step apart where a column sum sits on a rounding boundary).
"""

import numpy as np
import pytest
import torch
from crossbar_reference import G_MAX, PLACE, K, M, S, agree, assert_same_alone_or_in_a_batch, fused_columns, read

from nvcim import driver
from nvcim.firmware_emu.contract.program_format import Layer, Program, Tile
from nvcim.firmware_emu.converters import (
    ConverterPath,
    ConverterSettings,
    LayerConverters,
    NoiseStream,
    ReadNoiseMap,
    weight_bounds,
)

from zoo import cnn_images, export


def _layer(in_features: int, out_features: int, rows: int, units: int, seed: int,
           skip: set[tuple[int, int, int]] = frozenset(), arrays: int = 6, scale=0.01):
    """A layer tiled as the compiler tiles it, blocks spread over ``arrays`` arrays; returns
    the program and each tile's conductance (targets plus programming error)."""
    rng = np.random.default_rng(seed)
    tiles, cells = [], []
    n = 0
    for sign in (1, -1):
        for i in range(0, in_features, rows):
            for o in range(0, out_features, units):
                if (sign, i, o) in skip:
                    continue
                ni, no = min(rows, in_features - i), min(units, out_features - o)
                tiles.append(Tile(sign, n % arrays, 0, 0, i, ni, o, no))
                target = rng.integers(0, 4, (ni, no * S)).astype(np.float32)
                cells.append(target + rng.normal(0, 0.1, target.shape).astype(np.float32))
                n += 1
    layer = Layer("fc", in_features, out_features, scale, tiles)
    program = Program(M, K, rows, units * S, [], {}, [layer], [], [], [])
    return program, cells



def _reference(program, cells, settings, x, noise=None):
    """Per tile, float64: DAC, column sums (+ noise), ADC, shift-add, sign, scale; on a
    shift-add array the ADC reads the fused columns and nothing is shifted after it."""
    layer = program.layers[0]
    fused = [bool(settings.shift_add[t.array]) for t in layer.tiles]
    cells_read = [fused_columns(g) if f else g.astype(np.float64) for g, f in zip(cells, fused)]
    bound = np.zeros(len(settings.dac_bits))
    for t, g in zip(layer.tiles, cells_read):
        bound[t.array] = max(bound[t.array], np.abs(g).sum(axis=0).max() / G_MAX)
    y = np.zeros((len(x), layer.out_features))
    for i, (t, g) in enumerate(zip(layer.tiles, cells_read)):
        s = read(x[:, t.in_start:t.in_start + t.in_count], g, settings, t.array, bound,
                 None if noise is None else lambda u, i=i: noise(i, u))
        partial = s if fused[i] else s.reshape(len(x), t.out_count, S) @ PLACE
        y[:, t.out_start:t.out_start + t.out_count] += t.sign * partial
    return y * np.broadcast_to(layer.scale, (layer.out_features,))


def _plan(program, cells, settings):
    def conductance(layer, i):
        return cells[i]
    bound = weight_bounds(program, conductance, len(settings.dac_bits), settings.shift_add)
    return LayerConverters(program, 0, lambda i: cells[i], settings, bound)



@pytest.mark.parametrize("dac, adc", [(4, 6), (6, 4), (8, 8), (1, 2), (0, 6), (6, 0), (16, 24)])
def test_converters_match_the_per_tile_reference(dac, adc):
    program, cells = _layer(600, 150, 256, 64, seed=dac * 31 + adc, skip={(-1, 256, 64), (1, 512, 0)})
    settings = ConverterSettings.uniform(6, dac, adc)
    settings.adc_bits[3] = max(adc - 2, 0) if adc else 0      # one array coarser than the rest
    x = np.random.default_rng(7).standard_normal((40, 600)).astype(np.float32)
    got = _plan(program, cells, settings).product(x)
    want = _reference(program, cells, settings, x)
    bound = max(np.abs(g).sum(axis=0).max() for g in cells) / G_MAX
    step = 0.01 * G_MAX * np.abs(x).max() * 64 * bound / (max(1, 2 ** (max(adc - 2, 1) - 1) - 1) if adc else 1e4)
    agree(got, want, step)


def test_arrays_with_ideal_and_finite_dacs_side_by_side_match_the_reference():
    """Each group of tiles drives its rows through its own array's DAC: an ideal DAC (the
    vector divided by its scale) next to finite ones (levels) in one layer."""
    program, cells = _layer(600, 150, 256, 64, seed=11)
    settings = ConverterSettings.uniform(6, 5, 7)
    settings.dac_bits[[1, 4]] = 0
    x = np.random.default_rng(12).standard_normal((30, 600)).astype(np.float32)
    got = _plan(program, cells, settings).product(x)
    agree(got, _reference(program, cells, settings, x), 0.01 * G_MAX * np.abs(x).max() * 64 / 63)
    settings.dac_bits[[1, 4]] = 5                            # those arrays' DACs made finite: the result moves
    assert not np.allclose(_plan(program, cells, settings).product(x), got)


def test_fixed_full_scales_clip_and_match_the_reference():
    program, cells = _layer(300, 70, 128, 32, seed=3)
    settings = ConverterSettings.uniform(6, 6, 7, dac_fs=1.5, adc_fs=4.0)
    settings.dac_fs[1], settings.adc_fs[2] = 0.0, 0.0        # per-vector DAC and weight-bound ADC on some arrays
    x = 2 * np.random.default_rng(8).standard_normal((30, 300)).astype(np.float32)
    got = _plan(program, cells, settings).product(x)
    want = _reference(program, cells, settings, x)
    agree(got, want, 0.01 * G_MAX * 1.5 * 64 * 4.0 / 63)
    # the clip acts: a larger DAC range changes the result
    wider = ConverterSettings.uniform(6, 6, 7, dac_fs=50.0, adc_fs=4.0)
    assert not np.allclose(_plan(program, cells, wider).product(x), got)


def test_one_adc_resolution_everywhere_clips_at_the_fixed_full_scale():
    """Every tile as wide as the others (no padding columns) and one ADC resolution: the ADC must
    clip at the fixed full scale."""
    program, cells = _layer(256, 64, 128, 32, seed=4)
    settings = ConverterSettings.uniform(6, 6, 7, dac_fs=1.5, adc_fs=4.0)
    plan = _plan(program, cells, settings)
    x = 2 * np.random.default_rng(9).standard_normal((30, 256)).astype(np.float32)
    got = plan.product(x)
    agree(got, _reference(program, cells, settings, x), 0.01 * G_MAX * 1.5 * 64 * 4.0 / 63)
    assert not np.allclose(_plan(program, cells, ConverterSettings.uniform(6, 6, 7, dac_fs=1.5, adc_fs=40.0))
                           .product(x), got)                       # the clip acts at 4.0


def test_ideal_converters_give_the_effective_matrix_product():
    program, cells = _layer(300, 100, 128, 32, seed=4)
    x = np.random.default_rng(9).standard_normal((20, 300)).astype(np.float32)
    layer = program.layers[0]
    w = np.zeros((300, 100))
    for t, g in zip(layer.tiles, cells):
        w[t.in_start:t.in_start + t.in_count, t.out_start:t.out_start + t.out_count] += \
            t.sign * g.reshape(t.in_count, t.out_count, S) @ PLACE
    got = _plan(program, cells, ConverterSettings.uniform(6)).product(x)
    np.testing.assert_allclose(got, x @ w * 0.01, rtol=1e-4, atol=1e-4 * np.abs(x @ w * 0.01).max())


@pytest.mark.parametrize("dac, adc", [(4, 4), (6, 6)])
def test_a_sample_gives_the_same_output_alone_or_in_a_batch(dac, adc):
    program, cells = _layer(600, 150, 256, 64, seed=5)
    plan = _plan(program, cells, ConverterSettings.uniform(6, dac, adc))
    assert_same_alone_or_in_a_batch(plan, seed=10)


def _noise_per_cell(rng, sigma, cells):
    """Reference read noise: every cell read draws its own Gaussian (std sigma * g_max)."""
    def noise(i, u):
        g = cells[i]
        cell_noise = rng.normal(0, sigma * G_MAX, (u.shape[0], *g.shape))
        return np.einsum("pi,pij->pj", u, cell_noise) / G_MAX
    return noise


def test_read_noise_matches_per_cell_reads_and_the_one_draw_formula():
    program, cells = _layer(40, 12, 16, 4, seed=6, skip={(-1, 16, 4)})
    settings = ConverterSettings.uniform(6)
    plan = _plan(program, cells, settings)
    x = np.random.default_rng(11).standard_normal((3, 40)).astype(np.float32)
    draws = 4000
    xs = np.repeat(x, draws, axis=0)
    clean = plan.product(xs)
    sigma = 0.05
    noisy = plan.product(xs, sigma, NoiseStream(1))
    measured = (noisy - clean).reshape(3, draws, 12).std(axis=1)
    # reference: per-cell noise, many draws of the slow model
    rng = np.random.default_rng(12)
    ref = np.stack([_reference(program, cells, settings, x, _noise_per_cell(rng, sigma, cells))
                    for _ in range(1500)])
    ref_std = (ref - _reference(program, cells, settings, x)).std(axis=0)
    formula = ReadNoiseMap(program, 0).std(x, sigma)
    assert np.abs(measured / formula - 1).max() < 0.08      # 4000 draws: ~1.1 % standard error per element
    assert abs(np.mean(measured / formula) - 1) < 0.02
    assert np.abs(ref_std / formula - 1).max() < 0.12       # 1500 draws: ~1.8 %
    assert abs(np.mean(ref_std / formula) - 1) < 0.03


def test_read_noise_passes_through_finite_converters_and_a_seed_reproduces_it():
    program, cells = _layer(600, 150, 256, 64, seed=7)
    plan = _plan(program, cells, ConverterSettings.uniform(6, 8, 8))
    x = np.random.default_rng(13).standard_normal((64, 600)).astype(np.float32)
    clean = plan.product(x)
    a = plan.product(x, 0.2, NoiseStream(5))
    b = plan.product(x, 0.2, NoiseStream(5))
    stream = NoiseStream(5)
    first, second = plan.product(x, 0.2, stream), plan.product(x, 0.2, stream)
    assert np.array_equal(a, b) and np.array_equal(a, first)
    assert not np.array_equal(first, second) and not np.array_equal(a, clean)
    # noise of about one ADC step passes 8-bit converters at the size the ideal path gives it,
    # plus a little of the rounding it now straddles
    formula = ReadNoiseMap(program, 0).std(x, 0.2)
    ratio = (a - clean).std() / np.sqrt(np.mean(formula ** 2))
    assert 1.0 < ratio < 1.2


def test_a_converter_path_prepares_each_layer_once_and_needs_a_stream_for_noise():
    program, cells = _layer(300, 70, 128, 32, seed=8)
    calls = []

    def conductance(layer, i):
        calls.append(i)
        return cells[i]

    path = ConverterPath(program, conductance, ConverterSettings.uniform(6, 6, 6))
    x = np.random.default_rng(14).standard_normal((5, 300)).astype(np.float32)
    first = path.product()(0, x)
    seen = len(calls)
    assert np.array_equal(path.product()(0, x), first) and len(calls) == seen
    with pytest.raises(ValueError, match="NoiseStream"):
        path.product(read_noise=0.1)


# -- analog shift-add readout ------------------------------------------------------------
@pytest.mark.parametrize("dac, adc", [(4, 6), (6, 4), (8, 8), (1, 2), (0, 6), (6, 0), (16, 24), (0, 0)])
def test_shift_add_readout_matches_the_per_tile_reference(dac, adc):
    program, cells = _layer(600, 150, 256, 64, seed=dac * 17 + adc + 1, skip={(-1, 256, 64), (1, 512, 0)})
    settings = ConverterSettings.uniform(6, dac, adc, shift_add=True)
    settings.adc_bits[3] = max(adc - 2, 0) if adc else 0      # one array coarser than the rest
    settings.shift_add[4] = False                               # one array keeps one ADC per column
    settings.dac_fs[1], settings.adc_fs[2] = 1.5, 150.0         # fixed full scales on two arrays
    x = np.random.default_rng(17).standard_normal((40, 600)).astype(np.float32)
    got = _plan(program, cells, settings).product(x)
    want = _reference(program, cells, settings, x)
    bound = max(np.abs(fused_columns(g)).sum(axis=0).max() for g in cells) / G_MAX
    step = 0.01 * G_MAX * np.abs(x).max() * max(bound, 150.0) / (
        max(1, 2 ** (max(adc - 2, 1) - 1) - 1) if adc else 1e4)
    agree(got, want, step)
    if not (dac or adc):                                        # ideal converters: the effective matrix
        w = np.zeros((600, 150))
        for t, g in zip(program.layers[0].tiles, cells):
            w[t.in_start:t.in_start + t.in_count, t.out_start:t.out_start + t.out_count] += t.sign * fused_columns(g)
        np.testing.assert_allclose(got, x @ w * 0.01, rtol=1e-4, atol=1e-4 * np.abs(x @ w * 0.01).max())


def test_shift_add_readout_differs_from_column_readout_and_its_bound_is_the_fused_one():
    program, cells = _layer(300, 70, 128, 32, seed=21)
    x = np.random.default_rng(18).standard_normal((30, 300)).astype(np.float32)
    column = _plan(program, cells, ConverterSettings.uniform(6, 6, 6)).product(x)
    fused = _plan(program, cells, ConverterSettings.uniform(6, 6, 6, shift_add=True)).product(x)
    assert not np.allclose(column, fused)
    # a program's converter path finds the fused bound of its shift-add arrays itself
    settings = ConverterSettings.uniform(6, 6, 6, shift_add=True)
    path = ConverterPath(program, lambda layer, i: cells[i], settings)
    bound = max(np.abs(fused_columns(g)).sum(axis=0).max() for g in cells) / G_MAX
    agree(path.product()(0, x), _reference(program, cells, settings, x), 0.01 * G_MAX * np.abs(x).max() * bound / 31)
    shift_add = np.zeros(6, bool)
    shift_add[::2] = True
    bound = weight_bounds(program, lambda layer, i: cells[i], 6, shift_add)
    for a in range(6):
        on = [g for t, g in zip(program.layers[0].tiles, cells) if t.array == a]
        read = [fused_columns(g) if shift_add[a] else g for g in on]
        assert bound[a] == pytest.approx(max(np.abs(g).sum(axis=0).max() for g in read) / G_MAX, rel=1e-6)


@pytest.mark.parametrize("bits", [4, 6])
def test_shift_add_gives_a_sample_the_same_output_alone_or_in_a_batch(bits):
    program, cells = _layer(600, 150, 256, 64, seed=22)
    plan = _plan(program, cells, ConverterSettings.uniform(6, bits, bits, shift_add=True))
    assert_same_alone_or_in_a_batch(plan, seed=19)


def test_shift_add_read_noise_is_the_cells_noise_through_the_fused_columns():
    program, cells = _layer(40, 12, 16, 4, seed=23, skip={(-1, 16, 4)})
    settings = ConverterSettings.uniform(6, shift_add=True)
    plan = _plan(program, cells, settings)
    x = np.random.default_rng(20).standard_normal((3, 40)).astype(np.float32)
    draws, sigma = 4000, 0.05
    xs = np.repeat(x, draws, axis=0)
    measured = (plan.product(xs, sigma, NoiseStream(2)) - plan.product(xs)).reshape(3, draws, 12).std(axis=1)
    # the formula: std read_noise * ||u_rows|| * sqrt(sum_j 4^(jK)) per fused sum (here u = x), in output units
    variance = np.zeros((3, 12))
    for t in program.layers[0].tiles:
        rows = x[:, t.in_start:t.in_start + t.in_count].astype(np.float64)
        variance[:, t.out_start:t.out_start + t.out_count] += \
            (rows ** 2).sum(axis=1, keepdims=True) * (PLACE ** 2).sum()
    formula = 0.01 * sigma * G_MAX * np.sqrt(variance)
    # reference: every cell read draws its own Gaussian, the fused column sums its slices' currents
    rng = np.random.default_rng(21)

    def noise(i, u):
        g = cells[i]
        per_cell = rng.normal(0, sigma * G_MAX, (u.shape[0], *g.shape))
        columns = np.einsum("pi,pij->pj", u, per_cell) / G_MAX
        return columns.reshape(u.shape[0], -1, S) @ PLACE

    ref = np.stack([_reference(program, cells, settings, x, noise) for _ in range(1500)])
    ref_std = (ref - _reference(program, cells, settings, x)).std(axis=0)
    assert np.abs(measured / formula - 1).max() < 0.08
    assert abs(np.mean(measured / formula) - 1) < 0.02
    assert np.abs(ref_std / formula - 1).max() < 0.12
    assert abs(np.mean(ref_std / formula) - 1) < 0.03
    # through 8-bit converters: reproducible from the stream, different on the next draw
    plan = _plan(program, cells, ConverterSettings.uniform(6, 8, 8, shift_add=True))
    stream = NoiseStream(3)
    first, second = plan.product(xs[:64], 0.2, stream), plan.product(xs[:64], 0.2, stream)
    assert np.array_equal(first, plan.product(xs[:64], 0.2, NoiseStream(3))) and not np.array_equal(first, second)


# -- on the chip: registers, runs, calibration ------------------------------------------
CHIP = "emu://?sigma=0.3&seed=2&rows=32&cols=64"






def test_full_scale_registers_are_per_array_checked_and_reset():
    with driver.open("emu://?arrays=4") as dev:
        dev.write_register("ARRAY_SELECT", 1)
        dev.write_register("ARRAY_DAC_FS", 3 << 16)
        dev.write_register("ARRAY_ADC_FS", 5 << 15)
        assert (dev.read_register("ARRAY_DAC_FS"), dev.read_register("ARRAY_ADC_FS")) == (3 << 16, 5 << 15)
        dev.write_register("ARRAY_SELECT", 2)
        assert (dev.read_register("ARRAY_DAC_FS"), dev.read_register("ARRAY_ADC_FS")) == (0, 0)
        with pytest.raises(driver.DeviceError, match="ARRAY_ADC_FS value 2147483648 exceeds the maximum"):
            dev.write_register("ARRAY_ADC_FS", 1 << 31)
        assert dev.read_register("ARRAY_ADC_FS") == 0
        dev.write_register("CONTROL", 1)                       # SOFT_RESET: back to automatic ranges
        dev.write_register("ARRAY_SELECT", 1)
        assert dev.read_register("ARRAY_DAC_FS") == 0


@pytest.mark.parametrize("bits", [0, 8])
def test_read_noise_changes_every_run_and_run_seed_reproduces_them(cnn_path, bits):
    x = cnn_images(6, 1)
    options = f"&dac_bits={bits}&adc_bits={bits}" if bits else ""
    with driver.load(cnn_path, device=f"{CHIP}{options}") as sess:
        clean = sess.run(None, {"x": x})[0]
        sess.device.write_register("READ_NOISE", round(0.05 * 65536))
        first, second = sess.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
        assert not np.array_equal(first, second) and not np.array_equal(first, clean)
        sess.device.write_register("RUN_SEED", 7)
        a, b = sess.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
        sess.device.write_register("RUN_SEED", 7)
        assert np.array_equal(sess.run(None, {"x": x})[0], a) and np.array_equal(sess.run(None, {"x": x})[0], b)
        assert not np.array_equal(a, b)
        sess.device.write_register("READ_NOISE", 0)
        assert np.array_equal(sess.run(None, {"x": x})[0], clean)


def test_both_paths_carry_the_same_read_noise(cnn_path):
    """Through ideal converters the chip draws one Gaussian per output (convolutions
    included); through fine converters one per column sum: the noise must be the same size."""
    x = np.repeat(cnn_images(2, 2), 400, axis=0)

    def noise_std(options: str) -> np.ndarray:
        with driver.load(cnn_path, device=f"{CHIP}{options}") as sess:
            clean = sess.run(None, {"x": x})[0]
            sess.device.write_register("READ_NOISE", round(0.02 * 65536))
            return (sess.run(None, {"x": x})[0] - clean).reshape(2, 400, -1).std(axis=1)

    ideal, fine = noise_std(""), noise_std("&dac_bits=16&adc_bits=24")
    assert ideal.min() > 0
    ratio = ideal / fine
    assert abs(np.mean(ratio) - 1) < 0.03 and np.abs(ratio - 1).max() < 0.25


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("calibrated", [False, True])
def test_a_sample_runs_the_same_alone_or_in_a_batch_of_256_on_the_chip(cnn_path, bits, calibrated):
    x = cnn_images(256, 3)
    x[100] *= 30                                               # a loud neighbour
    calibration = {"x": cnn_images(64, 4)} if calibrated else None
    with driver.load(cnn_path, device=f"{CHIP}&dac_bits={bits}&adc_bits={bits}", calibration=calibration) as sess:
        batch = sess.run(None, {"x": x})[0]
        for i in (0, 100, 255):
            assert np.array_equal(sess.run(None, {"x": x[i:i + 1]})[0][0], batch[i])


def test_calibration_sets_the_used_arrays_and_narrows_the_adc_range(cnn_path):
    x = cnn_images(32, 5)
    with driver.load(cnn_path, device=CHIP, calibration={"x": cnn_images(8, 6)}) as sess:
        assert sess.device.read_register("ARRAY_SELECT") == 0xFFFFFFFF      # left selecting all arrays
        ideal = sess.run(None, {"x": x})[0]
    errors = {}
    for calibrated in (False, True):
        calibration = {"x": cnn_images(128, 6)} if calibrated else None
        with driver.load(cnn_path, device=f"{CHIP}&dac_bits=8&adc_bits=6", calibration=calibration) as sess:
            used = sorted({t.array for layer in sess.program.layers for t in layer.tiles})
            for a in used:
                sess.device.write_register("ARRAY_SELECT", a)
                assert (sess.device.read_register("ARRAY_ADC_FS") > 0) == calibrated
            errors[calibrated] = np.abs(sess.run(None, {"x": x})[0] - ideal).mean()
    assert errors[True] < 0.7 * errors[False]


def test_calibration_names_missing_inputs(cnn_path):
    with pytest.raises(ValueError, match="must name exactly the program inputs"):
        driver.load(cnn_path, device=CHIP, calibration={"image": cnn_images(4, 0)})


def test_shift_add_is_a_per_array_field_of_array_converters():
    value = 6 | 7 << 8 | 1 << 16
    with driver.open("emu://?arrays=4") as dev:
        dev.write_register("ARRAY_SELECT", 1)
        dev.write_register("ARRAY_CONVERTERS", value)
        assert dev.read_register("ARRAY_CONVERTERS") == value
        dev.write_register("ARRAY_SELECT", 2)
        assert dev.read_register("ARRAY_CONVERTERS") == 0
        dev.write_register("ARRAY_SELECT", 1)
        for bad in (1 << 18, 7 << 16, 1 << 31):
            with pytest.raises(driver.DeviceError, match="SHIFT_ADD 0 or 1"):
                dev.write_register("ARRAY_CONVERTERS", bad)
        assert dev.read_register("ARRAY_CONVERTERS") == value
        dev.write_register("CONTROL", 1)                       # SOFT_RESET: the build's readout
        assert dev.read_register("ARRAY_CONVERTERS") == 0
    with driver.open("emu://?arrays=4&adc_bits=8&readout=shift_add") as dev:
        dev.write_register("CONTROL", 1)
        for a in range(4):
            dev.write_register("ARRAY_SELECT", a)
            assert dev.read_register("ARRAY_CONVERTERS") == 8 << 8 | 1 << 16
    with pytest.raises(driver.LinkError, match="readout='fused' is not valid"):
        driver.open("emu://?readout=fused")


@pytest.mark.parametrize("differential", [False, True])
def test_calibration_in_shift_add_readout_sets_the_fused_range(cnn_path, differential):
    """Each array that reads (in differential readout a pair's even array) gets the fused range
    calibration measured for its readout, wider than the per-column range, and it narrows the error."""
    from nvcim.driver.calibration import calibrate

    x = cnn_images(32, 5)
    with driver.load(cnn_path, device=CHIP) as sess:
        ideal = sess.run(None, {"x": x})[0]
    errors = {}
    for calibrated in (False, True):
        calibration = {"x": cnn_images(128, 6)} if calibrated else None
        device = f"{CHIP}&dac_bits=8&adc_bits=6&readout=shift_add&differential={int(differential)}"
        with driver.load(cnn_path, device=device, calibration=calibration) as sess:
            measured = calibrate(sess.program, calibration) if calibrated else None
            column, fused = (measured.differential if differential else (measured.adc_fs, measured.adc_fs_shift_add)) \
                if calibrated else ({}, {})
            reading = {t.array & ~1 if differential else t.array for layer in sess.program.layers for t in layer.tiles}
            for a in sorted(reading):
                sess.device.write_register("ARRAY_SELECT", a)
                raw = sess.device.read_register("ARRAY_ADC_FS")
                if calibrated:
                    assert raw == int(np.ceil(fused[a] * 65536))
                    assert fused[a] > column[a]
                else:
                    assert raw == 0
            errors[calibrated] = np.abs(sess.run(None, {"x": x})[0] - ideal).mean()
    assert errors[True] < 0.7 * errors[False]


def test_the_readout_is_stored_in_the_build_and_an_older_build_reads_column():
    from nvcim.firmware_emu.config import ChipConfig
    from nvcim.firmware_emu.contract.registers import Readout

    config = ChipConfig(**ChipConfig.parse_options({"readout": "shift_add", "adc_bits": "6"}))
    stored = config.to_dict()
    assert ChipConfig.from_dict(stored) == config and config.readout == Readout.SHIFT_ADD
    del stored["readout"]                                      # an image written before the option existed
    assert ChipConfig.from_dict(stored).readout == Readout.COLUMN


class _Residual(torch.nn.Module):
    """A conv whose biased output feeds both a RELU and an ADD: only its bias may join the product."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        h = self.c1(x)
        return self.fc((torch.relu(h) + h).flatten(1))


@pytest.mark.parametrize("model, fused", [
    ("cnn", [(True, True), (True, False)]),          # c1: bias and RELU; grouped c2: neither; fc: bias
    ("residual", [(True, False), (True, False)]),    # c1: its RELU's input is also the ADD's; fc: bias
])
def test_a_layers_bias_and_relu_in_its_product_give_the_instructions_bits(cnn_path, tmp_path, monkeypatch,
                                                                            model, fused):
    """Through converters a layer's product applies the bias ADD and RELU that follow it while its
    outputs are in cache (executor._epilogue): with read noise on, the outputs are bit for bit
    those of the instructions run one by one, and it joins only what nothing else reads."""
    from nvcim.firmware_emu import executor

    if model == "residual":
        torch.manual_seed(1)
        path = export(_Residual().eval(), tmp_path / "residual.onnx", (3, 8, 8), dynamo=False)
    else:
        path = cnn_path
    x = cnn_images(48, 5)
    joined, find = [], executor._epilogue

    def recorded(*args):
        epilogue, last = find(*args)
        if epilogue is not None:
            joined.append((epilogue.bias is not None, epilogue.relu))
        return epilogue, last

    with driver.load(path, device=f"{CHIP}&dac_bits=6&adc_bits=6") as sess:
        sess.device.write_register("READ_NOISE", round(0.05 * 65536))
        runs = []
        for epilogues in (recorded, lambda program, at, *rest: (None, at)):
            monkeypatch.setattr(executor, "_epilogue", epilogues)
            sess.device.write_register("RUN_SEED", 3)
            runs.append(sess.run(None, {"x": x})[0])
    assert joined == fused
    assert np.array_equal(runs[0], runs[1])
