"""Converter full scales from calibration data, set at deploy.

A chip's converters need a range: the input DAC a full scale to clip and divide by, the
column ADC the largest column sum it resolves. Left at 0 the chip takes them per input
vector (DAC) and from the weights' bound (ADC) - safe, but the ADC's range then covers
sums the network never produces and its levels are spread thin. Calibration measures the
ranges the network really uses: the quantised program runs on the host (every cell at
its target, the contract's reference kernels) on a calibration batch, and for every tile

* the DAC full scale of its array is the largest |x| any of the tile's input rows takes;
* the ADC full scale of its array is the largest |sum_i u_i g_ij / g_max| over the tile's
  columns, with u = x / (the array's DAC full scale) as the DAC drives it; for an array in
  analog shift-add readout (ARRAY_CONVERTERS.SHIFT_ADD) the largest fused column sum,
  sum_j 2^(jK) sum_i u_i g_i,oS+j / g_max over the tile's weight columns o;
* in differential readout (ARRAY_CONVERTERS.DIFFERENTIAL) the ADCs of a pair's even array
  read a positive tile minus its mirror: the same two sums of that difference, on the
  even array (measured when the program's placement is paired).

An array holding several tiles takes the largest value of its tiles. Every ADC range is
measured; ``apply`` writes the one each array's readout reads (as ARRAY_CONVERTERS says
when it is applied, so set the readout first). The values are
written to ARRAY_DAC_FS / ARRAY_ADC_FS (Q16.16, rounded up) after programming; a sample
beyond the calibrated range clips, as on a real chip. They depend on the program and the
calibration batch only, never on what the chip runs later, so a sample's output stays
the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from nvcim.firmware_emu.contract import interpreter, ops
from nvcim.firmware_emu.contract.pairing import PairingError, Unit, pair_units, unit_cells
from nvcim.firmware_emu.contract.program_format import Opcode, Program, effective_weights
from nvcim.firmware_emu.contract.registers import ALL_ARRAYS, LIMITS, Q16, field

from .device import Device


@dataclass(frozen=True)
class Calibration:
    """Full scales per array the program uses: DAC in input units, ADC in normalised column-sum
    units, for one ADC per column (``adc_fs``) and for analog shift-add readout (``adc_fs_shift_add``);
    ``differential`` the two ADC ranges of the pairs' even arrays in differential readout (empty
    when the program's placement is not paired)."""

    dac_fs: dict[int, float]
    adc_fs: dict[int, float]
    adc_fs_shift_add: dict[int, float]
    differential: tuple[dict[int, float], dict[int, float]] = ({}, {})


def _layer_inputs(program: Program, feeds: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Every crossbar layer's input rows (P, in_features) in the program's reference run."""
    weights: dict[int, np.ndarray] = {}

    def weight(index: int) -> np.ndarray:
        if index not in weights:
            tiles = program.layers[index].tiles
            weights[index] = effective_weights(
                program, index, lambda i: program.tile_cells(tiles[i]).astype(np.float32))
        return weights[index]

    env = interpreter.bind_inputs(program, feeds)
    inputs: dict[int, np.ndarray] = {}
    for ins in program.instructions:
        args = [env[t] for t in ins.inputs]
        if ins.op == Opcode.MATMUL:
            inputs[ins.layer] = args[0].reshape(-1, program.layers[ins.layer].in_features)
        elif ins.op == Opcode.CONV:
            group = ins.attrs["group"][0]
            rows = program.layers[ins.layer].in_features
            cols, _ = ops.im2col(ins, args[0], rows)
            for g in range(group):
                inputs[ins.layer + g] = cols[:, g * rows:(g + 1) * rows]
        for tid, out in zip(ins.outputs, ops.execute(ins, args, weight)):
            env[tid] = out
    return inputs


def calibrate(program: Program, feeds: list[np.ndarray] | Mapping[str, np.ndarray]) -> Calibration:
    """The full scales of every array ``program`` uses, measured on the calibration batch ``feeds``
    (a list in program input order, or by input name)."""
    if isinstance(feeds, Mapping):
        names = [program.tensors[t].name for t in program.inputs]
        if sorted(feeds) != sorted(names):
            raise ValueError(f"calibration data must name exactly the program inputs {names}, got {sorted(feeds)}")
        feeds = [np.asarray(feeds[n], np.float32) for n in names]
    g_max = float((1 << program.cell_bits) - 1)
    place = 2.0 ** (program.cell_bits * np.arange(program.slices))
    inputs = _layer_inputs(program, list(feeds))
    dac: dict[int, float] = {}
    for index, x in inputs.items():
        for t in program.layers[index].tiles:
            rows = x[:, t.in_start:t.in_start + t.in_count]
            dac[t.array] = max(dac.get(t.array, 0.0), float(np.abs(rows).max(initial=0.0)))

    def ranges(units: list[list[Unit]], scale_of: Callable[[Unit], float]) -> tuple[dict, dict]:
        """Largest |column sum| and |fused sum| per reading array over ``units``, in DAC full-scale units."""
        column: dict[int, float] = {}
        fused: dict[int, float] = {}
        for index, x in inputs.items():
            for unit in units[index]:
                fs = scale_of(unit)
                if fs <= 0:
                    continue
                t = program.layers[index].tiles[unit.tile]
                rows = x[:, t.in_start:t.in_start + t.in_count].astype(np.float64)
                g = unit_cells(unit, lambda i, index=index: program.tile_cells(program.layers[index].tiles[i]))
                sums = rows @ g.astype(np.float64) / (g_max * fs)
                fused_sums = sums.reshape(len(rows), t.out_count, program.slices) @ place
                a = unit.array
                column[a] = max(column.get(a, 0.0), float(np.abs(sums).max(initial=0.0)))
                fused[a] = max(fused.get(a, 0.0), float(np.abs(fused_sums).max(initial=0.0)))
        return column, fused

    arrays = 2 + max((t.array for layer in program.layers for t in layer.tiles), default=0)
    adc, adc_fused = ranges(pair_units(program, np.zeros(arrays, bool)), lambda u: dac[u.array])   # every tile alone
    try:                            # the even array's DAC drives both of a pair's tiles
        paired = ranges(pair_units(program, np.ones(arrays, bool)),
                        lambda u: max(dac.get(u.array, 0.0), dac.get(u.array + 1, 0.0)))
    except PairingError:
        paired = ({}, {})
    return Calibration(dac, adc, adc_fused, paired)


def _q16(value: float, name: str, array: int) -> int:
    raw = int(np.ceil(value * Q16))
    if raw > LIMITS[name]:
        raise ValueError(f"{name} of array {array}: {value:g} exceeds the register's range "
                         f"({LIMITS[name] / Q16:g}); scale the model's inputs down")
    return raw


def apply(device: Device, calibration: Calibration) -> None:
    """Write the full scales to the arrays' ARRAY_DAC_FS / ARRAY_ADC_FS, the ADC's for the readout
    each array's ARRAY_CONVERTERS (SHIFT_ADD, DIFFERENTIAL) selects now; arrays with nothing measured
    (0) keep the chip's automatic ranges. A pair in differential readout takes its even array's DAC
    range on both arrays (the even array's DAC drives it). ARRAY_SELECT is left selecting all arrays."""
    shift_add, differential = (field("ARRAY_CONVERTERS", f).mask for f in ("SHIFT_ADD", "DIFFERENTIAL"))
    try:
        values = []                      # every value checked before the first is written
        measured = calibration.dac_fs
        for array in sorted(set(measured) | {a & ~1 for a in measured}):   # a pair's even array reads it
            device.write_register("ARRAY_SELECT", array)
            converters = device.read_register("ARRAY_CONVERTERS")
            if array not in measured and not converters & differential:
                continue
            dac_fs = measured.get(array, 0.0)
            if converters & differential:
                if not calibration.differential[0]:
                    raise ValueError(f"array {array} reads differentially (ARRAY_CONVERTERS.DIFFERENTIAL) but the "
                                     f"program's placement is not paired: compile it with pairs=True")
                dac_fs = max(dac_fs, measured.get(array ^ 1, 0.0))
                adc = calibration.differential[1 if converters & shift_add else 0]
            else:
                adc = calibration.adc_fs_shift_add if converters & shift_add else calibration.adc_fs
            values.append((array, "ARRAY_DAC_FS", _q16(dac_fs, "ARRAY_DAC_FS", array)))
            if array in adc:
                values.append((array, "ARRAY_ADC_FS", _q16(adc[array], "ARRAY_ADC_FS", array)))
        for array, name, raw in values:
            device.write_register("ARRAY_SELECT", array)
            device.write_register(name, raw)
    finally:
        device.write_register("ARRAY_SELECT", ALL_ARRAYS)
