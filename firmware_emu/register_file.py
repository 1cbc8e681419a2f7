"""The chip's register file: what REG_READ and REG_WRITE reach.

Register storage with power-on values loaded from the build (``ChipConfig``), bus errors,
the limits each setting accepts, the performance counters, the per-array converter
resolutions, and the STATUS / IRQ_FLAGS / error bookkeeping the other parts report
through. CONTROL strobes and the settings a running operation reads concern the whole
chip: the register file hands them to the chip through the callbacks it is built with.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import MAX_ADC_BITS, MAX_DAC_BITS, ChipConfig
from .contract.device import PRESETS
from .contract.protocol import MAX_PAYLOAD, ErrorCode, WriteStats
from .contract.registers import ALL_ARRAYS, BY_OFFSET, LIMITS, Q16, REGISTERS, Access, DeviceModelCode
from .contract.registers import field as register_field
from .contract.variation import VariationMode
from .converters import ConverterSettings, NoiseStream
from .drift import Aging
from .errors import ChipError
from .physics import DeviceModel, pulse_cost

# bits of the strobe, status and interrupt registers, as the register map declares them
CONTROL_SOFT_RESET, CONTROL_START, CONTROL_ABORT = (
    register_field("CONTROL", f).mask for f in ("SOFT_RESET", "START", "ABORT"))
STATUS_READY, STATUS_BUSY, STATUS_PROGRAM_LOADED, STATUS_ERROR, STATUS_BUS_ERROR = (
    register_field("STATUS", f).mask for f in ("READY", "BUSY", "PROGRAM_LOADED", "ERROR", "BUS_ERROR"))
CONFIG_CLIP, CONFIG_PER_CELL_STATE = (register_field("CONFIG", f).mask for f in ("CLIP", "PER_CELL_STATE"))
IRQ_DONE, IRQ_ERROR, IRQ_VERIFY_FAIL, IRQ_ABORTED = (
    register_field("IRQ_FLAGS", f).mask for f in ("DONE", "ERROR", "VERIFY_FAIL", "ABORTED"))
CONVERTERS_SHIFT_ADD = register_field("ARRAY_CONVERTERS", "SHIFT_ADD")
CONVERTERS_DIFFERENTIAL = register_field("ARRAY_CONVERTERS", "DIFFERENTIAL")
STATUS_LIVE = STATUS_READY | STATUS_BUSY | STATUS_PROGRAM_LOADED  # computed on every read, never stored

COUNTERS = tuple(r.name[4:-3].lower() for r in REGISTERS if r.name.startswith("CNT_") and r.name.endswith("_LO"))


class RegisterFile:
    """Registers, counters and converter settings of one chip, and the generator SEED seeds.

    ``live_status()`` gives the STATUS bits the chip's state decides (READY, BUSY,
    PROGRAM_LOADED); ``control(value)`` acts on a CONTROL write; ``guard(name)`` refuses
    (raises ChipError) a write to a setting that a running operation reads.
    """

    def __init__(self, config: ChipConfig, live_status: Callable[[], int], control: Callable[[int], None],
                 guard: Callable[[str], None]):
        self.config = config
        self.live_status, self.control, self.guard = live_status, control, guard
        self.power_on()

    def power_on(self) -> None:
        """Every register, counter and converter to its power-on value; reseed. CLOCK, the
        cells' retention clock, is non-volatile: it keeps its value."""
        c = self.config
        clock = self.regs["CLOCK"] if hasattr(self, "regs") else 0
        self.regs = {r.name: r.reset for r in REGISTERS}
        self.regs["CLOCK"] = clock
        self.regs.update(
            CAP_ARRAYS=c.arrays, CAP_GEOMETRY=c.rows | (c.cols << 16),
            CAP_CELL=c.weight_bits | (c.cell_bits << 8), CAP_BUFFER=c.buffer_size,
            CAP_MAX_PAYLOAD=MAX_PAYLOAD, UID_LO=c.unique_id & 0xFFFFFFFF, UID_HI=c.unique_id >> 32,
            SIGMA=round(c.sigma * Q16), SEED=c.seed & 0xFFFFFFFF,
            DEVICE_MODEL=int(c.model), READ_NOISE=round(c.read_noise * Q16),
            CONFIG=CONFIG_CLIP * int(c.clip) | CONFIG_PER_CELL_STATE * int(c.variation),
            STUCK_RATE=round(c.stuck_rate * Q16),
            ARRAY_CONVERTERS=c.dac_bits | c.adc_bits << 8 | int(c.readout) << CONVERTERS_SHIFT_ADD.lsb
            | int(c.differential) << CONVERTERS_DIFFERENTIAL.lsb)
        self.dac_bits = np.full(c.arrays, c.dac_bits, dtype=np.uint8)
        self.adc_bits = np.full(c.arrays, c.adc_bits, dtype=np.uint8)
        self.shift_add = np.full(c.arrays, bool(c.readout), dtype=bool)  # ARRAY_CONVERTERS.SHIFT_ADD
        self.differential = np.full(c.arrays, bool(c.differential), dtype=bool)  # .DIFFERENTIAL, per pair
        self.differential[c.arrays & ~1:] = False                             # the last array of an odd count
        self.dac_fs = np.zeros(c.arrays, dtype=np.uint32)  # Q16.16 per array; 0: per-vector input scale
        self.adc_fs = np.zeros(c.arrays, dtype=np.uint32)  # Q16.16 per array; 0: the weight bound
        self.all_ideal = not (c.dac_bits or c.adc_bits)  # every converter ideal: runs skip the check
        self.counters = {name: 0 for name in COUNTERS}
        self.reseed()
        self.restart_runs()

    def reseed(self) -> None:
        """The chip's random generator, from SEED (at power-on, and when SEED is written)."""
        self.rng = np.random.default_rng(self.regs["SEED"])

    def restart_runs(self) -> None:
        """Runs draw their read noise from the streams after RUN_SEED, from the first again."""
        self.runs = 0

    def next_run_noise(self) -> NoiseStream:
        """The read-noise stream of the next run: the RUN_SEED's streams one after another."""
        stream = NoiseStream([self.regs["RUN_SEED"], self.runs])
        self.runs += 1
        return stream

    def converters(self) -> ConverterSettings:
        """Every array's converter settings as a run uses them (full scales as numbers)."""
        return ConverterSettings(self.dac_bits, self.adc_bits, self.dac_fs / Q16, self.adc_fs / Q16, self.shift_add,
                                 self.differential)

    @property
    def device(self) -> DeviceModel:
        """The cell model the settings registers describe now."""
        config = self.regs["CONFIG"]
        return DeviceModel(cell_bits=self.config.cell_bits, sigma=self.regs["SIGMA"] / Q16,
                           model=DeviceModelCode(self.regs["DEVICE_MODEL"]),
                           read_noise=self.regs["READ_NOISE"] / Q16, clip=bool(config & CONFIG_CLIP),
                           variation=VariationMode(bool(config & CONFIG_PER_CELL_STATE)),
                           weight_bits=self.config.weight_bits)

    @property
    def aging(self) -> Aging:
        """What the cells are read under now: CLOCK, and the drift SEED and DEVICE_MODEL fix."""
        retention = PRESETS[DeviceModelCode(self.regs["DEVICE_MODEL"])].retention
        return Aging(self.regs["CLOCK"], self.regs["SEED"], retention)

    # -- REG_READ / REG_WRITE ----------------------------------------------------------
    def read(self, addr: int) -> int:
        reg = BY_OFFSET.get(addr)
        if reg is None:
            self._bus_error(addr, ErrorCode.BUS_ERROR, f"read of unmapped address 0x{addr:03X}")
        name = reg.name
        if name == "STATUS":
            return self.regs["STATUS"] & ~STATUS_LIVE | self.live_status()
        if name.startswith("CNT_"):
            value = self.counters[name[4:-3].lower()]
            return (value >> 32) & 0xFFFFFFFF if name.endswith("_HI") else value & 0xFFFFFFFF
        if name in ("ARRAY_CONVERTERS", "ARRAY_DAC_FS", "ARRAY_ADC_FS"):
            a = self.regs["ARRAY_SELECT"]
            a = 0 if a == ALL_ARRAYS else a
            if name == "ARRAY_DAC_FS":
                return int(self.dac_fs[a])
            if name == "ARRAY_ADC_FS":
                return int(self.adc_fs[a])
            return (int(self.dac_bits[a]) | int(self.adc_bits[a]) << 8
                    | int(self.shift_add[a]) << CONVERTERS_SHIFT_ADD.lsb
                    | int(self.differential[a]) << CONVERTERS_DIFFERENTIAL.lsb)
        if reg.access == Access.WO:
            return 0
        return self.regs[name]

    def write(self, addr: int, value: int) -> None:
        reg = BY_OFFSET.get(addr)
        if reg is None:
            self._bus_error(addr, ErrorCode.BUS_ERROR, f"write to unmapped address 0x{addr:03X}")
        if reg.access == Access.RO:
            self._bus_error(addr, ErrorCode.READ_ONLY, f"write to read-only register {reg.name} (0x{addr:03X})")
        name = reg.name
        if reg.access == Access.W1C:
            self.regs[name] &= ~value
            return
        if name == "CONTROL":
            self.control(value)
            return
        self.guard(name)
        if name == "ARRAY_CONVERTERS":
            dac, adc = value & 0xFF, (value >> 8) & 0xFF
            if value & ~(0xFFFF | CONVERTERS_SHIFT_ADD.mask | CONVERTERS_DIFFERENTIAL.mask) \
                    or dac > MAX_DAC_BITS or adc > MAX_ADC_BITS:
                raise ChipError(ErrorCode.BAD_ARGUMENT, f"ARRAY_CONVERTERS value 0x{value:X}: DAC_BITS must be "
                                f"0..{MAX_DAC_BITS}, ADC_BITS 0..{MAX_ADC_BITS}, SHIFT_ADD 0 or 1 (bit 16), "
                                f"DIFFERENTIAL 0 or 1 (bit 17), bits 18..31 0; register unchanged")
            a = self.regs["ARRAY_SELECT"]
            target = slice(None) if a == ALL_ARRAYS else a
            self.dac_bits[target], self.adc_bits[target] = dac, adc
            self.shift_add[target] = bool(value & CONVERTERS_SHIFT_ADD.mask)
            pair = slice(None) if a == ALL_ARRAYS else slice(a & ~1, (a & ~1) + 2)   # both arrays of the pair
            self.differential[pair] = bool(value & CONVERTERS_DIFFERENTIAL.mask)
            self.differential[len(self.differential) & ~1:] = False
            self.all_ideal = not (self.dac_bits.any() or self.adc_bits.any())
            return
        self._check_setting(name, value)
        if name in ("ARRAY_DAC_FS", "ARRAY_ADC_FS"):
            a = self.regs["ARRAY_SELECT"]
            (self.dac_fs if name == "ARRAY_DAC_FS" else self.adc_fs)[slice(None) if a == ALL_ARRAYS else a] = value
            return
        self.regs[name] = value
        if name == "SEED":
            self.reseed()
        elif name == "RUN_SEED":
            self.restart_runs()

    def _check_setting(self, name: str, value: int) -> None:
        problem = None
        if name == "DEVICE_MODEL" and value not in DeviceModelCode._value2member_map_:
            problem = f"is not a device model ({', '.join(f'{m.value}={m.name}' for m in DeviceModelCode)})"
        elif name in LIMITS and value > LIMITS[name]:
            problem = f"exceeds the maximum {LIMITS[name]}"
        elif name in ("VERIFY_TOL", "RUN_BATCH") and value == 0:
            problem = "must be > 0"
        elif name == "CLOCK" and value < self.regs["CLOCK"]:
            problem = f"is before the clock's value {self.regs['CLOCK']} (the retention clock only moves forward)"
        elif name == "ARRAY_SELECT" and value != ALL_ARRAYS and value >= self.config.arrays:
            problem = f"is not an array (chip has {self.config.arrays}; 0xFFFFFFFF selects all)"
        if problem:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name} value {value} {problem}; register unchanged")

    def _bus_error(self, addr: int, code: ErrorCode, message: str):
        self.regs["STATUS"] |= STATUS_BUS_ERROR
        self.regs["ERROR_ADDR"] = addr
        raise ChipError(code, message)

    # -- what the other parts report -----------------------------------------------------
    def count(self, stats: WriteStats) -> None:
        """Add the pulses of one command (or one chunk of it) to the counters."""
        c = self.counters
        c["write_pulses"] += stats.write_pulses
        c["read_pulses"] += stats.read_pulses
        c["verify_iters"] += stats.verify_iterations
        c["verify_fails"] += stats.verify_failures
        c["cells_written"] += stats.cells
        busy, energy = pulse_cost(stats.write_pulses, stats.read_pulses)
        c["busy_ns"] += busy
        c["energy_pj"] += energy

    def account(self, stats: WriteStats) -> None:
        """Count a whole command's pulses and flag it done (VERIFY_FAIL too if a cell failed)."""
        self.count(stats)
        self.done(IRQ_VERIFY_FAIL if stats.verify_failures else 0)

    def done(self, extra_flags: int = 0, done: bool = True) -> None:
        self.regs["IRQ_FLAGS"] |= (IRQ_DONE if done else 0) | extra_flags

    def record_error(self, code: ErrorCode, irq: int = IRQ_ERROR) -> None:
        self.regs["STATUS"] |= STATUS_ERROR
        self.regs["ERROR_CODE"] = int(code)
        self.regs["IRQ_FLAGS"] |= irq

    def clear_error(self) -> None:
        self.regs["STATUS"] &= ~STATUS_ERROR
