"""``ChipConfig``: what an emulated chip is built with, as a datasheet's ordering code fixes it.

Its geometry (the contract's ``Geometry``) and the power-on values of its settings
registers; parsed from ``emu://`` URL options and ``serve`` flags, stored in the
non-volatile image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .contract.geometry import Geometry
from .contract.registers import DeviceModelCode, Readout
from .contract.variation import VariationMode

MAX_DAC_BITS, MAX_ADC_BITS = 16, 24
# What an emulated chip may be built with (docs/reliability.md#chip-options-and-their-limits):
MAX_CELLS = 1 << 30            # arrays x rows x cols; 13 bytes of host memory per programmed cell
MAX_WEIGHT_BITS = 16
BUFFER_SIZE_RANGE = (1 << 10, 1 << 28)  # staging buffer bytes, allocated when the chip powers up
MAX_SEED = 0xFFFFFFFF          # SEED is a 32-bit register
MAX_UID = (1 << 64) - 1        # UID_HI:UID_LO


@dataclass(frozen=True)
class ChipConfig(Geometry):
    """Build-time parameters of a chip (what a datasheet's ordering code fixes): its geometry,
    and the power-on values of its settings."""

    # power-on values of the settings registers
    sigma: float = 0.3
    seed: int = 0
    model: DeviceModelCode = DeviceModelCode.GAUSSIAN
    read_noise: float = 0.0
    clip: bool = False
    variation: VariationMode = VariationMode.WEIGHT_MAGNITUDE  # CONFIG.PER_CELL_STATE; option "weight" / "cell"
    stuck_rate: float = 0.0
    dac_bits: int = 0   # every array's input DAC (0: ideal)
    adc_bits: int = 0   # every array's column ADC (0: ideal)
    readout: Readout = Readout.COLUMN  # every array's ARRAY_CONVERTERS.SHIFT_ADD; option "column" / "shift_add"
    differential: bool = False  # every array pair's ARRAY_CONVERTERS.DIFFERENTIAL; option 0 / 1
    uid: int = 0        # the unique-ID fuse (UID_HI:UID_LO); 0: derived from the build seed

    def __post_init__(self):
        super().__post_init__()
        if self.arrays * self.rows * self.cols > MAX_CELLS:
            raise ValueError(f"arrays x rows x cols = {self.arrays} x {self.rows} x {self.cols} cells is more than "
                             f"the emulator's {MAX_CELLS} (2^30)")
        if not 0 < self.weight_bits <= MAX_WEIGHT_BITS:
            raise ValueError(f"weight_bits={self.weight_bits} must be in 1..{MAX_WEIGHT_BITS}")
        low, high = BUFFER_SIZE_RANGE
        if not low <= self.buffer_size <= high:
            raise ValueError(f"buffer_size={self.buffer_size} must be in {low}..{high} bytes (1 KiB..256 MiB)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be in 0..{MAX_SEED}")
        if not 0 <= self.uid <= MAX_UID:
            raise ValueError(f"uid={self.uid} must be in 0..2^64-1")
        for name in ("sigma", "read_noise"):
            if not 0 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 2] (units of g_max)")
        if not 0 <= self.stuck_rate <= 1:
            raise ValueError(f"stuck_rate={self.stuck_rate} must be in [0, 1]")
        if not (0 <= self.dac_bits <= MAX_DAC_BITS and 0 <= self.adc_bits <= MAX_ADC_BITS):
            raise ValueError(f"dac_bits={self.dac_bits} / adc_bits={self.adc_bits} must be in "
                             f"0..{MAX_DAC_BITS} / 0..{MAX_ADC_BITS} (0: ideal)")

    @classmethod
    def parse_options(cls, options: dict[str, str]) -> dict:
        """Typed values of text options (URL query or command line), naming any bad one."""
        fields = [f for f in cls.__dataclass_fields__]
        kwargs: dict = {}
        for key, text in options.items():
            if key not in fields:
                raise ValueError(f"unknown chip option '{key}' (known: {', '.join(fields)}, image)")
            try:
                if key == "model":
                    kwargs[key] = DeviceModelCode[text.upper()]
                elif key in ("sigma", "read_noise", "stuck_rate"):
                    kwargs[key] = float(text)
                elif key in ("clip", "differential"):
                    kwargs[key] = {"0": False, "1": True, "false": False, "true": True}[text.lower()]
                elif key == "readout":
                    kwargs[key] = {"column": Readout.COLUMN, "shift_add": Readout.SHIFT_ADD,
                                   "0": Readout.COLUMN, "1": Readout.SHIFT_ADD}[text.lower()]
                elif key == "variation":
                    kwargs[key] = {"weight": VariationMode.WEIGHT_MAGNITUDE, "cell": VariationMode.CELL_STATE,
                                   "0": VariationMode.WEIGHT_MAGNITUDE, "1": VariationMode.CELL_STATE}[text.lower()]
                else:
                    kwargs[key] = int(text, 0)
            except (KeyError, ValueError):
                choices = {"model": ", ".join(m.name for m in DeviceModelCode), "clip": "0 or 1",
                           "differential": "0 or 1", "variation": "weight or cell",
                           "readout": "column or shift_add"}.get(key, "a number")
                raise ValueError(f"chip option {key}={text!r} is not valid (expected {choices})") from None
        return kwargs

    @property
    def unique_id(self) -> int:
        """The chip's unique ID: the ``uid`` fuse, else a 64-bit mix of the build seed (splitmix64), so
        chips built with different seeds differ and a chip keeps its ID in its image."""
        if self.uid:
            return self.uid
        z = (self.seed + 0x9E3779B97F4A7C15) & MAX_UID
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MAX_UID
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MAX_UID
        return z ^ (z >> 31)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = int(self.model)
        d["variation"] = int(self.variation)
        d["readout"] = int(self.readout)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ChipConfig:
        """The configuration ``to_dict`` stored; a ValueError or TypeError names a field it cannot hold."""
        defaults = cls()
        for key, value in d.items():
            kind = type(getattr(defaults, key, None))
            fits = (isinstance(value, bool) if kind is bool else
                    isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                    isinstance(value, int) and not isinstance(value, bool))
            if not fits:
                raise TypeError(f"{key}={value!r} is not {'true/false' if kind is bool else 'a number'}")
        return cls(**{**d, "model": DeviceModelCode(d["model"]),
                      "variation": VariationMode(d.get("variation", VariationMode.WEIGHT_MAGNITUDE)),
                      "readout": Readout(d.get("readout", Readout.COLUMN))})
