"""The cell device as the datasheet states it: presets, settings and the formulas they imply.

What one write pulse does to a cell is fixed by a few settings: the device preset
(DEVICE_MODEL), the programming variation (SIGMA), the read noise (READ_NOISE), clipping
(CONFIG.CLIP), what a preset's middle band is tested on (CONFIG.PER_CELL_STATE) and the
bits per weight and per cell of the build; how cells drift afterwards is the preset's. The emulated chip's cell physics
(numpy) and the host's noise model for training and Monte Carlo (torch) both read them
from here, so the chip and the tools cannot disagree about the device.
docs/device-model.md derives the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registers import DEFAULT_BUILD, DeviceModelCode
from .retention import FEFET_RETENTION, NO_DRIFT, RRAM_RETENTION, Retention
from .variation import VariationMode, band_sigmas, in_band, weight_sigmas


@dataclass(frozen=True)
class DevicePreset:
    """A cell technology's state-dependent variation (docs/device-model.md#state-dependent-presets).

    Weights (or, per CONFIG.PER_CELL_STATE, cell states) in the middle band (0.25, 0.75)
    vary ``mid_band_factor`` (the datasheet's s) times as much as the others;
    ``erased_state_sigma``, when given, is the std of state 0 (weight level 0, or cell
    state 0) in units of g_max, whatever SIGMA says. ``retention``: how programmed cells
    drift afterwards (docs/device-model.md#drift).
    """

    code: DeviceModelCode
    mid_band_factor: float = 1.0
    erased_state_sigma: float | None = None
    retention: Retention = NO_DRIFT

    @property
    def uniform(self) -> bool:
        """Every state has the same std, sigma itself (closed-form sampling applies)."""
        return self.mid_band_factor == 1.0 and self.erased_state_sigma is None


PRESETS: dict[DeviceModelCode, DevicePreset] = {p.code: p for p in (
    DevicePreset(DeviceModelCode.GAUSSIAN),
    DevicePreset(DeviceModelCode.RRAM1, retention=RRAM_RETENTION),
    DevicePreset(DeviceModelCode.FEFET2, 2.0, erased_state_sigma=0.01, retention=FEFET_RETENTION),
    DevicePreset(DeviceModelCode.RRAM4, 4.0, retention=RRAM_RETENTION),
    DevicePreset(DeviceModelCode.FEFET6, 6.0, retention=FEFET_RETENTION),
)}


def g_max(cell_bits: int) -> float:
    """Largest cell state, the unit every conductance and noise setting is measured in."""
    return float((1 << cell_bits) - 1)


@dataclass(frozen=True)
class DeviceSettings:
    """One chip's device settings, as its DEVICE_MODEL, SIGMA, READ_NOISE and CONFIG registers hold them.

    ``sigma`` and ``read_noise`` are stds in units of g_max; ``model`` is a preset code
    or its name ("FEFET2"); ``cell_bits`` / ``weight_bits`` are the build's bits per cell
    and per weight; ``variation`` says whether a preset's band is tested on the weight
    magnitude (the default, U-SWIM's model) or on each cell's state.
    """

    sigma: float = 0.3
    model: DeviceModelCode = DeviceModelCode.GAUSSIAN
    cell_bits: int = DEFAULT_BUILD["cell_bits"]
    read_noise: float = 0.0
    clip: bool = False
    variation: VariationMode = VariationMode.WEIGHT_MAGNITUDE
    weight_bits: int = DEFAULT_BUILD["weight_bits"]

    def __post_init__(self):
        if isinstance(self.model, str):
            if self.model.upper() not in DeviceModelCode.__members__:
                raise ValueError(f"device model {self.model!r} is not one of {', '.join(DeviceModelCode.__members__)}")
            object.__setattr__(self, "model", DeviceModelCode[self.model.upper()])
        elif not isinstance(self.model, DeviceModelCode):
            object.__setattr__(self, "model", DeviceModelCode(self.model))
        object.__setattr__(self, "variation", VariationMode(self.variation))
        for name in ("sigma", "read_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (a std in units of g_max)")

    @property
    def preset(self) -> DevicePreset:
        return PRESETS[self.model]

    @property
    def g_max(self) -> float:
        return g_max(self.cell_bits)

    @property
    def uniform(self) -> bool:
        """Every cell state has std ``sigma``: no per-state lookup needed."""
        return self.preset.uniform

    @property
    def slices(self) -> int:
        """S = M/K cells per weight."""
        return self.weight_bits // self.cell_bits

    @property
    def retention(self) -> Retention:
        return self.preset.retention

    def state_sigmas(self) -> tuple[float, ...]:
        """Std of a write pulse per target state 0 .. g_max, in units of g_max (per-cell-state rule).

        A preset with factor s rescales sigma to sigma' = sigma / sqrt(0.4 s^2 + 0.6)
        (the average variance stays sigma^2 when 40 % of the pulses fall in the middle
        band), then gives middle-band states s * sigma' and the others sigma'.
        """
        preset = self.preset
        base, wide = band_sigmas(self.sigma, preset.mid_band_factor)
        sigmas = [wide if in_band(state, self.g_max) else base for state in range(int(self.g_max) + 1)]
        if preset.erased_state_sigma is not None:
            sigmas[0] = preset.erased_state_sigma
        return tuple(sigmas)

    def cell_sigmas(self, states: np.ndarray, levels: np.ndarray | None = None) -> np.ndarray | float:
        """Relative std (units of g_max) of a write pulse on each cell.

        ``states``: the cells' target states; ``levels``: the level of the weight each
        cell belongs to (contract.variation.region_levels), needed by the per-weight rule.
        A uniform device returns the scalar ``sigma``.
        """
        if self.uniform:
            return self.sigma
        if self.variation == VariationMode.CELL_STATE:
            return np.asarray(self.state_sigmas(), dtype=np.float32)[states]
        if levels is None:
            raise ValueError("the per-weight-magnitude rule needs the level of each cell's weight")
        return self.weight_sigma(levels)

    def weight_sigma(self, levels: np.ndarray) -> np.ndarray:
        """Per weight of the given levels, the relative std its S cells get under the per-weight rule."""
        preset = self.preset
        return weight_sigmas(levels, self.weight_bits, self.sigma, preset.mid_band_factor, preset.erased_state_sigma)
