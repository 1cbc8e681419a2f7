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
  sum_j 2^(jK) sum_i u_i g_i,oS+j / g_max over the tile's weight columns o.

An array holding several tiles takes the largest value of its tiles. Both ADC ranges are
measured; ``apply`` writes the one each array's readout reads (as ARRAY_CONVERTERS says
when it is applied, so set the readout first). The values are
written to ARRAY_DAC_FS / ARRAY_ADC_FS (Q16.16, rounded up) after programming; a sample
beyond the calibrated range clips, as on a real chip. They depend on the program and the
calibration batch only, never on what the chip runs later, so a sample's output stays
the same alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nvcim.firmware_emu.contract import interpreter, ops
from nvcim.firmware_emu.contract.program_format import Opcode, Program, effective_weights
from nvcim.firmware_emu.contract.registers import ALL_ARRAYS, LIMITS, Q16, field

from .device import Device


@dataclass(frozen=True)
class Calibration:
    """Full scales per array the program uses: DAC in input units, ADC in normalised column-sum
    units, for one ADC per column (``adc_fs``) and for analog shift-add readout (``adc_fs_shift_add``)."""

    dac_fs: dict[int, float]
    adc_fs: dict[int, float]
    adc_fs_shift_add: dict[int, float]


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
    sums: list[tuple[int, float, float]] = []  # (array, largest |column sum|, largest |fused sum|) of one tile
    for index, x in inputs.items():
        for t in program.layers[index].tiles:
            rows = x[:, t.in_start:t.in_start + t.in_count].astype(np.float64)
            dac[t.array] = max(dac.get(t.array, 0.0), float(np.abs(rows).max(initial=0.0)))
            columns = rows @ program.tile_cells(t).astype(np.float64) / g_max
            fused = columns.reshape(len(rows), t.out_count, program.slices) @ place
            sums.append((t.array, float(np.abs(columns).max(initial=0.0)), float(np.abs(fused).max(initial=0.0))))
    adc: dict[int, float] = {}
    adc_fused: dict[int, float] = {}
    for array, column, fused in sums:
        if dac[array] > 0:
            adc[array] = max(adc.get(array, 0.0), column / dac[array])
            adc_fused[array] = max(adc_fused.get(array, 0.0), fused / dac[array])
    return Calibration(dac, adc, adc_fused)


def _q16(value: float, name: str, array: int) -> int:
    raw = int(np.ceil(value * Q16))
    if raw > LIMITS[name]:
        raise ValueError(f"{name} of array {array}: {value:g} exceeds the register's range "
                         f"({LIMITS[name] / Q16:g}); scale the model's inputs down")
    return raw


def apply(device: Device, calibration: Calibration) -> None:
    """Write the full scales to the arrays' ARRAY_DAC_FS / ARRAY_ADC_FS, the ADC's for the readout
    each array's ARRAY_CONVERTERS.SHIFT_ADD selects now; arrays with nothing measured (0) keep the
    chip's automatic ranges. ARRAY_SELECT is left selecting all arrays."""
    shift_add = field("ARRAY_CONVERTERS", "SHIFT_ADD").mask
    try:
        values = []                      # every value checked before the first is written
        for array in sorted(calibration.dac_fs):
            device.write_register("ARRAY_SELECT", array)
            values.append((array, "ARRAY_DAC_FS", _q16(calibration.dac_fs[array], "ARRAY_DAC_FS", array)))
            adc = (calibration.adc_fs_shift_add if device.read_register("ARRAY_CONVERTERS") & shift_add
                   else calibration.adc_fs)
            if array in adc:
                values.append((array, "ARRAY_ADC_FS", _q16(adc[array], "ARRAY_ADC_FS", array)))
        for array, name, raw in values:
            device.write_register("ARRAY_SELECT", array)
            device.write_register(name, raw)
    finally:
        device.write_register("ARRAY_SELECT", ALL_ARRAYS)
