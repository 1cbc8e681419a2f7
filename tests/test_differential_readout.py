"""Differential readout (ARRAY_CONVERTERS.DIFFERENTIAL): array pairs read as I+ - I- by one ADC.

The reference is written from the model's statement (docs/device-model.md#differential-readout):
per block in float64 with plain loops, the positive tile's cells minus its mirror's, through
the even array's DAC and ADC. The code under test pairs tiles itself (``pair_units``) and
stacks every pair of a layer into one batched float32 product.
"""

import numpy as np
import pytest
from crossbar_reference import G_MAX, PLACE, K, M, S, agree, assert_same_alone_or_in_a_batch, fused_columns, read

from nvcim import driver
from nvcim.compiler import Target, compile_model
from nvcim.firmware_emu.contract.program_format import Layer, Program, Tile
from nvcim.firmware_emu.converters import (
    ConverterPath,
    ConverterSettings,
    LayerConverters,
    NoiseStream,
    PairingError,
    ReadNoiseMap,
    pair_units,
)

from zoo import cnn_images

ARRAYS = 8


def _paired_layer(in_features, out_features, rows, units, seed, lone=frozenset()):
    """A layer placed in pairs: block b's positive tile on array 2p, its negative tile at the same spot
    of 2p+1 (p = b mod 4); ``lone`` (sign, in_start, out_start) blocks have only that sign's tile."""
    rng = np.random.default_rng(seed)
    tiles, cells, b = [], [], 0
    blocks = [(i, o) for i in range(0, in_features, rows) for o in range(0, out_features, units)]
    spot = {}
    for i, o in blocks:
        spot[(i, o)] = (2 * (b % (ARRAYS // 2)), (b // (ARRAYS // 2)) * rows)
        b += 1
    for sign in (1, -1):
        for i, o in blocks:
            if any(lo[1:] == (i, o) and lo[0] != sign for lo in lone):
                continue
            ni, no = min(rows, in_features - i), min(units, out_features - o)
            array, row = spot[(i, o)]
            tiles.append(Tile(sign, array + (sign < 0), row, 0, i, ni, o, no))
            target = rng.integers(0, 4, (ni, no * S)).astype(np.float32)
            cells.append(target + rng.normal(0, 0.1, target.shape).astype(np.float32))
    layer = Layer("fc", in_features, out_features, 0.01, tiles)
    return Program(M, K, 4 * rows, units * S, [], {}, [layer], [], [], []), cells



def _reference(program, cells, settings, x, noise=None):
    """Per block: (positive cells - mirror cells) through the even array's DAC, ADC (column or fused)."""
    layer = program.layers[0]
    reads = {}                                   # (in_start, out_start) -> [even array, sign, float64 cells]
    for t, g in zip(layer.tiles, cells):
        key = (t.in_start, t.out_start)
        g = g.astype(np.float64)
        if key in reads:
            reads[key][2] = reads[key][2] - g if t.sign < 0 else g - reads[key][2]
            reads[key][1] = 1
        else:
            reads[key] = [t.array & ~1, t.sign, g]
    tile_of = {(t.in_start, t.out_start): t for t in layer.tiles}
    for r in reads.values():
        if settings.shift_add[r[0]]:
            r[2] = fused_columns(r[2])
    bound = np.zeros(len(settings.dac_bits))
    for a, _, g in reads.values():
        bound[a] = max(bound[a], np.abs(g).sum(axis=0).max() / G_MAX)
    y = np.zeros((len(x), layer.out_features))
    for key, (a, sign, g) in reads.items():
        t = tile_of[key]
        out = read(x[:, t.in_start:t.in_start + t.in_count], g, settings, a, bound,
                   None if noise is None else lambda u, g=g: noise(u, g.shape[1]))
        if not settings.shift_add[a]:
            out = out.reshape(len(x), t.out_count, S) @ PLACE
        y[:, t.out_start:t.out_start + t.out_count] += sign * out
    return y * 0.01


def _plan(program, cells, settings):
    return LayerConverters(program, 0, lambda i: cells[i], settings,
                           ConverterPath(program, lambda layer, i: cells[i], settings).bound)



@pytest.mark.parametrize("shift_add", [False, True])
@pytest.mark.parametrize("dac, adc", [(4, 6), (8, 8), (0, 6), (6, 0), (0, 0)])
def test_differential_readout_matches_the_per_pair_reference(dac, adc, shift_add):
    program, cells = _paired_layer(600, 150, 256, 64, seed=dac * 7 + adc, lone={(1, 256, 64), (-1, 512, 0)})
    settings = ConverterSettings.uniform(ARRAYS, dac, adc, shift_add=shift_add, differential=True)
    settings.dac_fs[2], settings.adc_fs[4] = 1.5, 40.0          # fixed full scales on two pairs' even arrays
    settings.adc_bits[1] = 3                                     # an odd array's converters are not used
    x = np.random.default_rng(3).standard_normal((40, 600)).astype(np.float32)
    got = _plan(program, cells, settings).product(x)
    want = _reference(program, cells, settings, x)
    bound = max(np.abs(fused_columns(g) if shift_add else g).sum(axis=0).max() for g in cells) / G_MAX
    step = 0.01 * G_MAX * np.abs(x).max() * max(bound, 40.0) / (2 ** (adc - 1) - 1 if adc else 1e4)
    agree(got, want, step)
    if not (dac or adc):                                         # ideal converters: the effective matrix
        w = np.zeros((600, 150))
        for t, g in zip(program.layers[0].tiles, cells):
            w[t.in_start:t.in_start + t.in_count, t.out_start:t.out_start + t.out_count] += \
                t.sign * (g.reshape(len(g), -1, S) @ PLACE)
        np.testing.assert_allclose(got, x @ w * 0.01, rtol=1e-4, atol=1e-4 * np.abs(x @ w * 0.01).max())


def test_differential_readout_takes_half_the_adc_samples_and_multiply_adds():
    program, cells = _paired_layer(600, 150, 256, 64, seed=1)
    for shift_add in (False, True):
        alone = _plan(program, cells, ConverterSettings.uniform(ARRAYS, 8, 8, shift_add=shift_add))
        pairs = _plan(program, cells, ConverterSettings.uniform(ARRAYS, 8, 8, shift_add=shift_add,
                                                                differential=True))
        assert alone.sums == 2 * pairs.sums and alone.macs == 2 * pairs.macs
    assert pairs.sums == 3 * 150                                 # 3 row blocks x 150 weight columns, one ADC each


@pytest.mark.parametrize("bits", [4, 6])
def test_differential_gives_a_sample_the_same_output_alone_or_in_a_batch(bits):
    program, cells = _paired_layer(600, 150, 256, 64, seed=2)
    plan = _plan(program, cells, ConverterSettings.uniform(ARRAYS, bits, bits, shift_add=True, differential=True))
    assert_same_alone_or_in_a_batch(plan, seed=4)


def test_differential_read_noise_is_both_bit_lines_cells():
    program, cells = _paired_layer(40, 12, 16, 4, seed=5, lone={(1, 16, 4)})
    settings = ConverterSettings.uniform(ARRAYS, differential=True, shift_add=True)
    plan = _plan(program, cells, settings)
    x = np.random.default_rng(6).standard_normal((3, 40)).astype(np.float32)
    draws, sigma = 4000, 0.05
    xs = np.repeat(x, draws, axis=0)
    measured = (plan.product(xs, sigma, NoiseStream(2)) - plan.product(xs)).reshape(3, draws, 12).std(axis=1)
    # reference: every cell of both bit lines read with its own Gaussian (a lone tile's partner cells too)
    rng = np.random.default_rng(7)

    def noise(u, width):
        per_cell = rng.normal(0, sigma * G_MAX, (2, u.shape[0], u.shape[1], width * S))
        columns = np.einsum("pi,kpij->pj", u, per_cell) / G_MAX   # I+ noise plus I- noise
        return columns.reshape(u.shape[0], -1, S) @ PLACE

    ref = np.stack([_reference(program, cells, settings, x, noise) for _ in range(1500)])
    ref_std = (ref - _reference(program, cells, settings, x)).std(axis=0)
    assert np.abs(measured / ref_std - 1).max() < 0.15
    assert abs(np.mean(measured / ref_std) - 1) < 0.04
    formula = 0.01 * sigma * G_MAX * np.sqrt(2 * (PLACE ** 2).sum() * np.stack(
        [np.square(x[:, :16]).sum(1) + np.square(x[:, 16:32]).sum(1) + np.square(x[:, 32:]).sum(1)] * 12, axis=1))
    assert abs(np.mean(measured / formula) - 1) < 0.03
    # the ideal-converter path's one draw per output carries the same noise (a lone tile counted twice)
    units = pair_units(program, settings.differential)[0]
    lone = frozenset(u.tile for u in units if u.mirror is None)
    assert len(lone) == 1
    np.testing.assert_allclose(ReadNoiseMap(program, 0, lone).std(x, sigma), formula, rtol=1e-5)
    assert not np.allclose(ReadNoiseMap(program, 0).std(x, sigma), formula, rtol=1e-2)


def test_a_tile_facing_another_blocks_tile_is_named():
    program, cells = _paired_layer(600, 150, 256, 64, seed=8)
    tiles = program.layers[0].tiles
    partner = next(i for i, t in enumerate(tiles) if t.sign < 0 and t.in_start == 256 and t.out_start == 64)
    tiles[partner].out_start = 0                                 # now it faces the wrong positive tile
    differential = np.ones(ARRAYS, bool)
    with pytest.raises(PairingError, match=rf"layer 'fc' tile \d+ \(\+, array \d+.*faces layer 'fc' tile "
                                           rf"{partner} \(-.*not its mirror"):
        pair_units(program, differential)
    differential[:] = False
    assert len(pair_units(program, differential)[0]) == len(tiles)   # read alone: nothing to pair


def test_paired_placement_puts_mirrors_at_one_spot_of_an_array_pair(cnn_path):
    target = Target(arrays=64, rows=32, cols=64)
    program = compile_model(cnn_path, target, pairs=True)
    seen = set()
    for layer in program.layers:
        spots = {}
        for t in layer.tiles:
            spots.setdefault((t.in_start, t.out_start), []).append(t)
            assert t.array % 2 == (t.sign < 0)                  # positive on even arrays, negative on odd
            cells = {(t.array, r, c) for r in range(t.row, t.row + t.in_count)
                     for c in range(t.col, t.col + t.out_count * S)}
            assert not cells & seen                             # no two tiles share a cell
            seen |= cells
        for pair in spots.values():
            if len(pair) == 2:
                a, b = pair
                assert (a.array // 2, a.row, a.col) == (b.array // 2, b.row, b.col)
    units = pair_units(program, np.ones(64, bool))               # the chip finds every mirror
    assert sum(u.mirror is not None for layer in units for u in layer) > 0
    with pytest.raises(PairingError):                            # unpaired placement stacks other blocks there
        pair_units(compile_model(cnn_path, target), np.ones(64, bool))


# -- on the chip -------------------------------------------------------------------------
CHIP = "emu://?sigma=0.3&seed=2&rows=32&cols=64"






def test_differential_is_a_field_of_array_converters_set_per_pair():
    bit = 1 << 17
    with driver.open("emu://?arrays=5") as dev:
        dev.write_register("ARRAY_SELECT", 3)
        dev.write_register("ARRAY_CONVERTERS", 8 | bit)
        for array, want in ((2, bit), (3, 8 | bit), (1, 0), (4, 0)):   # the pair (2, 3) reads differentially
            dev.write_register("ARRAY_SELECT", array)
            assert dev.read_register("ARRAY_CONVERTERS") == want
        with pytest.raises(driver.DeviceError, match="DIFFERENTIAL 0 or 1"):
            dev.write_register("ARRAY_CONVERTERS", 1 << 18)
        dev.write_register("ARRAY_SELECT", 0xFFFFFFFF)
        dev.write_register("ARRAY_CONVERTERS", bit)
        dev.write_register("ARRAY_SELECT", 4)                    # the last of an odd count has no partner
        assert dev.read_register("ARRAY_CONVERTERS") == 0
    with driver.open("emu://?arrays=4&differential=1") as dev:
        dev.write_register("CONTROL", 1)                         # SOFT_RESET: the build's readout
        assert dev.read_register("ARRAY_CONVERTERS") == bit and dev.differential()


def test_the_driver_compiles_paired_for_a_differential_chip_and_it_runs_close_to_column_readout(cnn_path):
    x = cnn_images(64, 1)
    with driver.load(cnn_path, device=CHIP, cache=False) as sess:
        ideal = sess.run(None, {"x": x})[0]
    errors = {}
    for options in ("", "&differential=1"):
        with driver.load(cnn_path, device=f"{CHIP}&dac_bits=8&adc_bits=8{options}", cache=False) as sess:
            tiles = [t for layer in sess.program.layers for t in layer.tiles]
            assert all(t.array % 2 == (t.sign < 0) for t in tiles) == bool(options)
            errors[options] = np.abs(sess.run(None, {"x": x})[0] - ideal).mean()
    assert 0 < errors["&differential=1"] < 2 * errors[""]


def test_a_run_on_unpaired_tiles_is_refused_by_name_and_changes_nothing(cnn_path):
    x = cnn_images(8, 2)
    with driver.load(cnn_path, device=f"{CHIP}&dac_bits=8&adc_bits=8&read_noise=0.05") as sess:
        sess.device.write_register("ARRAY_CONVERTERS", 8 | 8 << 8 | 1 << 17)
        with pytest.raises(driver.DeviceError, match="DIFFERENTIAL on arrays 0/1: layer '.*' tile .* not its mirror"):
            sess.run(None, {"x": x})
        sess.device.write_register("ARRAY_CONVERTERS", 8 | 8 << 8)
        after = sess.run(None, {"x": x})[0]
    with driver.load(cnn_path, device=f"{CHIP}&dac_bits=8&adc_bits=8&read_noise=0.05") as sess:
        assert np.array_equal(sess.run(None, {"x": x})[0], after)   # the refused run took no noise stream


def test_a_partitioned_model_refuses_differential_chips(cnn_path):
    with pytest.raises(driver.InvalidArgument, match="read array pairs differentially"):
        driver.load(cnn_path, device=[f"{CHIP}&differential=1", CHIP])
