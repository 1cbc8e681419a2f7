"""The cell device as the datasheet states it: presets, settings and the formulas they imply.

What one write pulse does to a cell is fixed by a few settings: the device preset
(DEVICE_MODEL), the programming variation (SIGMA), the read noise (READ_NOISE), clipping
(CONFIG.CLIP) and the bits per cell of the build. The emulated chip's cell physics
(numpy) and the host's noise model for training and Monte Carlo (torch) both read them
from here, so the chip and the tools cannot disagree about the device.
docs/device-model.md derives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .registers import DEFAULT_BUILD, DeviceModelCode


@dataclass(frozen=True)
class DevicePreset:
    """A cell technology's state-dependent variation (docs/device-model.md#state-dependent-presets).

    Cells whose state lies in the middle band (0.25, 0.75) of g_max vary ``mid_band_factor``
    (the datasheet's s) times as much as the others; ``erased_state_sigma``, when given,
    is the std of state 0 in units of g_max, whatever SIGMA says.
    """

    code: DeviceModelCode
    mid_band_factor: float = 1.0
    erased_state_sigma: float | None = None

    @property
    def uniform(self) -> bool:
        """Every state has the same std, sigma itself (closed-form sampling applies)."""
        return self.mid_band_factor == 1.0 and self.erased_state_sigma is None


PRESETS: dict[DeviceModelCode, DevicePreset] = {p.code: p for p in (
    DevicePreset(DeviceModelCode.GAUSSIAN),
    DevicePreset(DeviceModelCode.RRAM1),
    DevicePreset(DeviceModelCode.FEFET2, 2.0, erased_state_sigma=0.01),
    DevicePreset(DeviceModelCode.RRAM4, 4.0),
    DevicePreset(DeviceModelCode.FEFET6, 6.0),
)}


def g_max(cell_bits: int) -> float:
    """Largest cell state, the unit every conductance and noise setting is measured in."""
    return float((1 << cell_bits) - 1)


@dataclass(frozen=True)
class DeviceSettings:
    """One chip's device settings, as its DEVICE_MODEL, SIGMA, READ_NOISE and CONFIG registers hold them.

    ``sigma`` and ``read_noise`` are stds in units of g_max; ``model`` is a preset code
    or its name ("FEFET2"); ``cell_bits`` is the build's bits per cell.
    """

    sigma: float = 0.3
    model: DeviceModelCode = DeviceModelCode.GAUSSIAN
    cell_bits: int = DEFAULT_BUILD["cell_bits"]
    read_noise: float = 0.0
    clip: bool = False

    def __post_init__(self):
        if isinstance(self.model, str):
            if self.model.upper() not in DeviceModelCode.__members__:
                raise ValueError(f"device model {self.model!r} is not one of {', '.join(DeviceModelCode.__members__)}")
            object.__setattr__(self, "model", DeviceModelCode[self.model.upper()])
        elif not isinstance(self.model, DeviceModelCode):
            object.__setattr__(self, "model", DeviceModelCode(self.model))
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

    def state_sigmas(self) -> tuple[float, ...]:
        """Std of a write pulse per target state 0 .. g_max, in units of g_max.

        A preset with factor s rescales sigma to sigma' = sigma / sqrt(0.4 s^2 + 0.6)
        (the average variance stays sigma^2 when 40 % of the pulses fall in the middle
        band), then gives middle-band states s * sigma' and the others sigma'.
        """
        preset = self.preset
        s = preset.mid_band_factor
        base = self.sigma / math.sqrt(0.4 * s * s + 0.6)
        top = self.g_max
        sigmas = [s * base if 0.25 < state / top < 0.75 else base for state in range(int(top) + 1)]
        if preset.erased_state_sigma is not None:
            sigmas[0] = preset.erased_state_sigma
        return tuple(sigmas)
