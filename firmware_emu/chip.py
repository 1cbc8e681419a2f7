"""The emulated chip: register file, staging buffer, cell arrays, executor, command handler.

A transport hands raw bytes to ``Chip.feed`` and sends back what it returns. Every frame
gets a reply; a frame that repeats the previous sequence number is answered from a cache
without running again, so a host may retransmit any command safely.

The long commands (CELLS_WRITE, CELLS_ERASE, RUN) work in chunks: row groups of cells,
batch slices of a run. Without FLAG_ASYNC the chunks run one after the other inside the
command; with it (and for a CONTROL.START run) the command is checked, acknowledged at
once, and the same chunks run on a chip-owned worker thread, so the bytes a chip writes
do not depend on how it was asked. Frame handling and every chunk take one chip lock, so
a host's frame is served between two chunks: that is where CONTROL.ABORT stops the work.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import types
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from . import executor
from .converters import LayerProduct, tiled_product
from .crossbar import CellArrays
from .nvm_image import NvmImage
from .physics import DeviceModel, pulse_cost
from .contract.program_format import (Program, ProgramFormatError, effective_weights, packed_size, parse_code,
                                      unpack_cells)
from .contract.protocol import (FLAG_ASYNC, FLAG_ERROR, FLAG_RESPONSE, MAX_PAYLOAD, BufReadArgs, BufWriteHeader,
                                CellMode, CellQuantity, CellsEraseArgs, CellsReadArgs, CellsReadReply, CellsWriteArgs,
                                CellsWriteReply, Command, ErrorCode, Frame, FrameError, FrameReader, Identity, IdentifyReply,
                                PayloadError, ProgramFetchReply, ProgramLoadArgs, RegReadArgs, RegReadReply,
                                RegWriteArgs, RunArgs, WriteStats, build_output_shapes, encode, error_payload,
                                parse_fixed, split_header)
from .contract.geometry import GEOMETRY_FIELDS, Geometry
from .contract.registers import (ALL_ARRAYS, BY_OFFSET, CHIP_ID_VALUE, LIMITS, Q16, REGISTERS, VERSION_VALUE, Access,
                        DeviceModelCode, OpState)
from .contract.registers import field as register_field


class ChipError(Exception):
    """A command the chip refuses; becomes an error reply with ``code``.

    ``record=False`` for a reply that reports an error without being one (OP_RESULT
    returning a background operation's error): it leaves the error registers alone.
    """

    def __init__(self, code: ErrorCode, message: str, record: bool = True):
        super().__init__(message)
        self.code = code
        self.record = record


MAX_DAC_BITS, MAX_ADC_BITS = 16, 24

# Chunks of the long commands: an abort takes effect, and a host's frame is served, between two.
WRITE_CHUNK_CELLS = 1 << 16  # CELLS_WRITE: whole rows, about this many cells (~10 ms of write-verify)
ERASE_CHUNK_CELLS = 1 << 18  # CELLS_ERASE: rows of one array, at most about this many cells
RUN_SLICE = 256              # RUN: samples per batch slice

# bits of the strobe, status and interrupt registers, as the register map declares them
CONTROL_SOFT_RESET, CONTROL_START, CONTROL_ABORT = (
    register_field("CONTROL", f).mask for f in ("SOFT_RESET", "START", "ABORT"))
STATUS_READY, STATUS_BUSY, STATUS_PROGRAM_LOADED, STATUS_ERROR, STATUS_BUS_ERROR = (
    register_field("STATUS", f).mask for f in ("READY", "BUSY", "PROGRAM_LOADED", "ERROR", "BUS_ERROR"))
IRQ_DONE, IRQ_ERROR, IRQ_VERIFY_FAIL, IRQ_ABORTED = (
    register_field("IRQ_FLAGS", f).mask for f in ("DONE", "ERROR", "VERIFY_FAIL", "ABORTED"))

# Commands served while a background operation runs; every other one is refused with BUSY.
SERVED_WHILE_BUSY = frozenset({Command.PING, Command.IDENTIFY, Command.REG_READ, Command.REG_WRITE, Command.OP_RESULT})
# Settings each background operation reads: a REG_WRITE to them is refused with BUSY while it runs.
SETTINGS_IN_USE: dict[Command, frozenset[str]] = {
    Command.CELLS_WRITE: frozenset({"DEVICE_MODEL", "SIGMA", "READ_NOISE", "SEED", "VERIFY_TOL", "VERIFY_MAX_ITER",
                                    "CONFIG", "STUCK_RATE"}),
    Command.CELLS_ERASE: frozenset(),
    Command.RUN: frozenset({"ARRAY_CONVERTERS"}),
    Command.INFER: frozenset({"ARRAY_CONVERTERS"}),
}
UNITS = {Command.CELLS_WRITE: "cells", Command.CELLS_ERASE: "rows", Command.RUN: "samples", Command.INFER: "samples"}


class _Abort(Exception):
    """Thrown into an operation's steps at a chunk boundary by CONTROL.ABORT."""


Steps = Generator[int, None, bytes]  # each next() runs one chunk and yields the units done; returns the reply


@dataclass(eq=False)
class Operation:
    """A checked long command, ready to run its chunks (in the command, or in the background)."""

    command: Command
    total: int    # units (UNITS[command]) of the whole operation
    steps: Steps  # primed: the first next() runs the first chunk
    done: int = 0
    state: OpState = OpState.RUNNING
    result: bytes | ChipError | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.command.name} ({self.done} of {self.total} {UNITS[self.command]} done)"


def _primed(steps: Steps) -> Steps:
    """Run a steps generator to its first ``yield 0``, inside its abort handler."""
    next(steps)
    return steps


def run_to_end(steps: Steps) -> bytes:
    """Run every remaining chunk here and return the reply (the synchronous form)."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


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
    stuck_rate: float = 0.0
    dac_bits: int = 0   # every array's input DAC (0: ideal)
    adc_bits: int = 0   # every array's column ADC (0: ideal)

    def __post_init__(self):
        super().__post_init__()
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
                elif key == "clip":
                    kwargs[key] = {"0": False, "1": True, "false": False, "true": True}[text.lower()]
                else:
                    kwargs[key] = int(text, 0)
            except (KeyError, ValueError):
                choices = {"model": ", ".join(m.name for m in DeviceModelCode), "clip": "0 or 1"}.get(key, "a number")
                raise ValueError(f"chip option {key}={text!r} is not valid (expected {choices})") from None
        return kwargs

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = int(self.model)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ChipConfig":
        return cls(**{**d, "model": DeviceModelCode(d["model"])})


COUNTERS = tuple(r.name[4:-3].lower() for r in REGISTERS if r.name.startswith("CNT_") and r.name.endswith("_LO"))


class Chip:
    def __init__(self, config: ChipConfig | None = None, image: NvmImage | None = None):
        self.config = config or ChipConfig()
        c = self.config
        self.cells = CellArrays(c.arrays, c.rows, c.cols)
        self.buffer = bytearray(c.buffer_size)
        self.image = image
        self.program_code: bytes | None = None
        self._reader = FrameReader(MAX_PAYLOAD)
        self._last: tuple[tuple[int, int, int], bytes] | None = None  # ((seq, command, payload crc), reply)
        self._weights_cache: dict[int, tuple[int, np.ndarray]] = {}
        self._arrays_used: tuple[Program | None, np.ndarray] = (None, np.zeros(0, np.intp))  # (program, its arrays)
        self._lock = threading.Lock()          # one frame or one chunk at a time
        self._gate = threading.Condition()     # hosts waiting for the lock go before the next chunk
        self._hosts_waiting = 0
        self.operation: Operation | None = None  # the running or last background operation
        self.power_on()

    @classmethod
    def with_image(cls, path: str, explicit: dict) -> "Chip":
        """Power up from the non-volatile image at ``path`` (created if absent).

        The image keeps the chip's geometry and settings; ``explicit`` settings (from
        ChipConfig.parse_options) override the settings, but not an existing geometry.
        """
        image = NvmImage(path)
        if not image.exists():
            chip = cls(ChipConfig(**explicit), image)
            chip._commit(set(), program_changed=False)
            return chip
        state = image.load()
        stored = ChipConfig.from_dict(state.config)
        clash = [f"{k}={explicit[k]} (image has {getattr(stored, k)})" for k in GEOMETRY_FIELDS
                 if k in explicit and explicit[k] != getattr(stored, k)]
        if clash:
            raise ValueError(f"image {path} was made for another chip geometry: {', '.join(clash)}")
        config = dataclasses.replace(stored, **explicit)
        chip = cls(config, image)
        for index, (g, target, noise) in state.arrays.items():
            chip.cells.g[index], chip.cells.target[index], chip.cells.noise[index] = g, target, noise
        chip.cells.generation += 1
        if state.program_code is not None:
            chip.program_code = state.program_code
            chip.program = chip._parse_program(state.program_code)
        if state.rng_state is not None and config.seed == stored.seed:
            chip.rng.bit_generator.state = state.rng_state
        return chip

    def _commit(self, arrays: set[int], program_changed: bool) -> None:
        """Persist what the last command changed to the image, atomically."""
        cells = self.cells
        planes = {a: ((cells.g[a], cells.target[a], cells.noise[a]) if cells.target[a].any() or cells.g[a].any()
                      else None) for a in sorted(arrays)}
        self.image.commit(self.config.to_dict(), planes, self.program_code if program_changed else False,
                          self.rng.bit_generator.state)

    # -- state ---------------------------------------------------------------------
    def power_on(self) -> None:
        """Reset every volatile part; the cell arrays are non-volatile and stay."""
        c = self.config
        self.regs = {r.name: r.reset for r in REGISTERS}
        self.regs.update(
            CAP_ARRAYS=c.arrays, CAP_GEOMETRY=c.rows | (c.cols << 16),
            CAP_CELL=c.weight_bits | (c.cell_bits << 8), CAP_BUFFER=c.buffer_size,
            CAP_MAX_PAYLOAD=MAX_PAYLOAD, SIGMA=round(c.sigma * Q16), SEED=c.seed & 0xFFFFFFFF,
            DEVICE_MODEL=int(c.model), READ_NOISE=round(c.read_noise * Q16), CONFIG=int(c.clip),
            STUCK_RATE=round(c.stuck_rate * Q16), ARRAY_CONVERTERS=c.dac_bits | c.adc_bits << 8)
        self.dac_bits = np.full(c.arrays, c.dac_bits, dtype=np.uint8)
        self.adc_bits = np.full(c.arrays, c.adc_bits, dtype=np.uint8)
        self._all_ideal = not (c.dac_bits or c.adc_bits)  # every converter ideal: runs skip the check
        self.counters = {name: 0 for name in COUNTERS}
        self.program: Program | None = self._parse_program(self.program_code) if self.program_code else None
        self._weights_cache.clear()
        self.rng = np.random.default_rng(self.regs["SEED"])
        self.operation = None  # never running here: SOFT_RESET is refused while BUSY

    @property
    def busy(self) -> bool:
        """A background operation is running (STATUS.BUSY)."""
        return self.operation is not None and self.operation.state == OpState.RUNNING

    @property
    def device(self) -> DeviceModel:
        return DeviceModel(cell_bits=self.config.cell_bits, sigma=self.regs["SIGMA"] / Q16,
                           model=DeviceModelCode(self.regs["DEVICE_MODEL"]),
                           read_noise=self.regs["READ_NOISE"] / Q16, clip=bool(self.regs["CONFIG"] & 1))

    def _status(self) -> int:
        live = (STATUS_BUSY if self.busy else STATUS_READY) | (STATUS_PROGRAM_LOADED if self.program is not None else 0)
        return self.regs["STATUS"] & ~(STATUS_READY | STATUS_BUSY | STATUS_PROGRAM_LOADED) | live

    # -- registers -----------------------------------------------------------------
    def read_register(self, addr: int) -> int:
        reg = BY_OFFSET.get(addr)
        if reg is None:
            self._bus_error(addr, ErrorCode.BUS_ERROR, f"read of unmapped address 0x{addr:03X}")
        name = reg.name
        if name == "STATUS":
            return self._status()
        if name.startswith("CNT_"):
            return self._counter(name)
        if name == "ARRAY_CONVERTERS":
            a = self.regs["ARRAY_SELECT"]
            a = 0 if a == ALL_ARRAYS else a
            return int(self.dac_bits[a]) | int(self.adc_bits[a]) << 8
        if reg.access == Access.WO:
            return 0
        return self.regs[name]

    def _counter(self, name: str) -> int:
        value = self.counters[name[4:-3].lower()]
        return (value >> 32) & 0xFFFFFFFF if name.endswith("_HI") else value & 0xFFFFFFFF

    def write_register(self, addr: int, value: int) -> None:
        reg = BY_OFFSET.get(addr)
        if reg is None:
            self._bus_error(addr, ErrorCode.BUS_ERROR, f"write to unmapped address 0x{addr:03X}")
        if reg.access == Access.RO:
            self._bus_error(addr, ErrorCode.READ_ONLY, f"write to read-only register {reg.name} (0x{addr:03X})")
        name = reg.name
        running = self.operation if self.busy else None
        if reg.access == Access.W1C:
            self.regs[name] &= ~value
        elif name == "CONTROL":
            self._control(value, running)
        elif running is not None and name in SETTINGS_IN_USE[running.command]:
            raise ChipError(ErrorCode.BUSY, f"{name} is in use by the running {running.describe()}; register "
                            f"unchanged (wait for STATUS.BUSY = 0, or write CONTROL.ABORT)")
        elif name == "ARRAY_CONVERTERS":
            dac, adc = value & 0xFF, (value >> 8) & 0xFF
            if value >> 16 or dac > MAX_DAC_BITS or adc > MAX_ADC_BITS:
                raise ChipError(ErrorCode.BAD_ARGUMENT, f"ARRAY_CONVERTERS value 0x{value:X}: DAC_BITS must be "
                                f"0..{MAX_DAC_BITS}, ADC_BITS 0..{MAX_ADC_BITS}, upper bits 0; register unchanged")
            a = self.regs["ARRAY_SELECT"]
            target = slice(None) if a == ALL_ARRAYS else a
            self.dac_bits[target], self.adc_bits[target] = dac, adc
            self._all_ideal = not (self.dac_bits.any() or self.adc_bits.any())
        else:
            self._check_setting(name, value)
            self.regs[name] = value
            if name == "SEED":
                self.rng = np.random.default_rng(value)

    def _control(self, value: int, running: Operation | None) -> None:
        """CONTROL strobes. While an operation runs only ABORT acts (SOFT_RESET and START are
        refused with BUSY, the whole write with them); with none running ABORT does nothing."""
        if running is not None:
            if value & (CONTROL_SOFT_RESET | CONTROL_START):
                what = "SOFT_RESET" if value & CONTROL_SOFT_RESET else "START"
                raise ChipError(ErrorCode.BUSY, f"CONTROL.{what} while {running.describe()} runs; nothing done "
                                f"(write CONTROL.ABORT alone first)")
            if value & CONTROL_ABORT:
                self._abort(running)
            return
        if value & CONTROL_START and self.program is None:  # refuse before the reset, so nothing changes
            raise ChipError(ErrorCode.NO_PROGRAM, "CONTROL.START: no program loaded (PROGRAM_LOAD first)")
        if value & CONTROL_SOFT_RESET:
            self.power_on()
        if value & CONTROL_START:
            self._start(self._run(self.regs["RUN_BATCH"], "CONTROL.START"))

    def _check_setting(self, name: str, value: int) -> None:
        problem = None
        if name == "DEVICE_MODEL" and value not in DeviceModelCode._value2member_map_:
            problem = f"is not a device model ({', '.join(f'{m.value}={m.name}' for m in DeviceModelCode)})"
        elif name in LIMITS and value > LIMITS[name]:
            problem = f"exceeds the maximum {LIMITS[name]}"
        elif name in ("VERIFY_TOL", "RUN_BATCH") and value == 0:
            problem = "must be > 0"
        elif name == "ARRAY_SELECT" and value != ALL_ARRAYS and value >= self.config.arrays:
            problem = f"is not an array (chip has {self.config.arrays}; 0xFFFFFFFF selects all)"
        if problem:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name} value {value} {problem}; register unchanged")

    def _bus_error(self, addr: int, code: ErrorCode, message: str):
        self.regs["STATUS"] |= STATUS_BUS_ERROR
        self.regs["ERROR_ADDR"] = addr
        raise ChipError(code, message)

    # -- frames --------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the reply bytes (possibly empty).

        Safe to call while a background operation runs: the frames are served between two
        of its chunks (a waiting host goes before the next chunk).
        """
        with self._gate:
            self._hosts_waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._gate:
                self._hosts_waiting -= 1
                self._gate.notify_all()
        try:
            return self._feed(data)
        finally:
            self._lock.release()

    def _feed(self, data: bytes) -> bytes:
        replies = []
        for item in self._reader.feed(data):
            if isinstance(item, FrameError):
                seq = 0xFFFF if item.seq is None else item.seq
                replies.append(encode(item.command, seq, error_payload(item.code, str(item)),
                                      FLAG_RESPONSE | FLAG_ERROR))
            else:
                replies.append(self._handle_frame(item))
        return b"".join(replies)

    def _handle_frame(self, frame: Frame) -> bytes:
        key = (frame.seq, frame.command, frame.crc)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            if frame.flags & FLAG_RESPONSE:
                raise ChipError(ErrorCode.BAD_ARGUMENT, "frame has the RESPONSE flag set: the chip takes requests only")
            code_before, operation_before, was_busy = self.program_code, self.operation, self.busy
            payload = self.execute(frame.command, frame.payload, frame.flags)
            started = self.operation is not operation_before and self.busy
            ended_here = was_busy and not self.busy  # CONTROL.ABORT: its ABORTED error stays in STATUS.ERROR
            if not self.busy:  # a background operation persists its cells when it ends
                if self.image is not None and (self.cells.dirty or self.program_code is not code_before):
                    self._commit(self.cells.dirty, self.program_code is not code_before)
                self.cells.dirty = set()
            # the reply to a request that started a background operation carries FLAG_ASYNC
            reply = encode(frame.command, frame.seq, payload, FLAG_RESPONSE | (FLAG_ASYNC if started else 0))
            if not ended_here:
                self.regs["STATUS"] &= ~STATUS_ERROR
        except Exception as e:  # every frame gets a reply; a fault inside the chip is INTERNAL
            if not isinstance(e, ChipError):
                e = ChipError(ErrorCode.INTERNAL, f"internal fault: {type(e).__name__}: {e}")
            if not self.busy:
                self.cells.dirty = set()
            if e.record:
                self._record_error(e.code, IRQ_ERROR)
            reply = encode(frame.command, frame.seq, error_payload(e.code, str(e)), FLAG_RESPONSE | FLAG_ERROR)
        self._last = (key, reply)
        return reply

    def _record_error(self, code: ErrorCode, irq: int) -> None:
        self.regs["STATUS"] |= STATUS_ERROR
        self.regs["ERROR_CODE"] = int(code)
        self.regs["IRQ_FLAGS"] |= irq

    def execute(self, command: int, payload: bytes, flags: int = 0) -> bytes:
        """Run one command; raise ChipError for anything the chip refuses.

        A long command is checked here; with FLAG_ASYNC in ``flags`` it then goes on in the
        background and the reply is empty, else its chunks all run before this returns.
        """
        handler = self._HANDLERS.get(command)
        if handler is None:
            raise ChipError(ErrorCode.UNKNOWN_COMMAND, f"unknown command 0x{command:02X}")
        if self.busy and command not in SERVED_WHILE_BUSY:
            raise ChipError(ErrorCode.BUSY, f"{Command(command).name} refused: {self.operation.describe()} is "
                            f"running in the background (poll STATUS.BUSY, or write CONTROL.ABORT)")
        result = handler(self, payload)
        if isinstance(result, Operation):
            if flags & FLAG_ASYNC:
                self._start(result)
                return b""
            return run_to_end(result.steps)
        return result

    # -- background operations -----------------------------------------------------
    def _start(self, operation: Operation) -> None:
        """Make ``operation`` the running one and hand its chunks to a worker thread."""
        self.operation = operation
        self.regs.update(OP_STATUS=int(operation.command) | OpState.RUNNING << 8, OP_PROGRESS=0,
                         OP_TOTAL=operation.total)
        threading.Thread(target=self._work, args=(operation,), name=f"nvcim-{operation.command.name}",
                         daemon=True).start()

    def _work(self, operation: Operation) -> None:
        """Worker thread: one chunk per turn of the chip lock, until the operation ends."""
        while True:
            with self._gate:  # a host waiting for the lock is served first
                self._gate.wait_for(lambda: self._hosts_waiting == 0)
            with self._lock:
                if operation.state != OpState.RUNNING:
                    return  # ended by CONTROL.ABORT while this thread waited
                try:
                    operation.done = next(operation.steps)
                    self.regs["OP_PROGRESS"] = operation.done
                except StopIteration as stop:
                    self._end(operation, stop.value)
                    return
                except Exception as e:
                    self._end(operation, e)
                    return

    def _abort(self, operation: Operation) -> None:
        """Stop ``operation`` now: the caller holds the chip lock, so this is a chunk boundary."""
        try:
            operation.steps.throw(_Abort())
        except StopIteration as stop:  # the operation had nothing left to do
            self._end(operation, stop.value)
        except Exception as e:
            self._end(operation, e)
        else:
            self._end(operation, ChipError(ErrorCode.INTERNAL, f"{operation.command.name} did not stop on abort"))

    def _end(self, operation: Operation, outcome: bytes | Exception) -> None:
        """Record how a background operation ended, set the flags, persist its cells."""
        if isinstance(outcome, Exception) and not isinstance(outcome, ChipError):
            outcome = ChipError(ErrorCode.INTERNAL, f"internal fault: {type(outcome).__name__}: {outcome}")
        if isinstance(outcome, ChipError):
            aborted = outcome.code == ErrorCode.ABORTED
            operation.state = OpState.ABORTED if aborted else OpState.FAILED
            self._record_error(outcome.code, IRQ_ABORTED if aborted else IRQ_ERROR)
        else:
            operation.state, operation.done = OpState.DONE, operation.total
        operation.result = outcome
        if self.image is not None and self.cells.dirty:
            try:
                self._commit(self.cells.dirty, program_changed=False)
            except Exception as e:  # the cells changed in the running chip, but not on disk
                operation.state = OpState.FAILED
                operation.result = ChipError(ErrorCode.INTERNAL, f"{operation.command.name}: image write failed "
                                             f"after the operation: {type(e).__name__}: {e}")
                self._record_error(ErrorCode.INTERNAL, IRQ_ERROR)
        self.cells.dirty = set()
        self.regs.update(OP_STATUS=int(operation.command) | operation.state << 8, OP_PROGRESS=operation.done)

    def _op_result(self, payload: bytes) -> bytes:
        """The last background operation's reply, or its error; changes nothing, so a host may repeat it."""
        _expect_empty("OP_RESULT", payload)
        operation = self.operation
        if operation is None:
            raise ChipError(ErrorCode.BAD_ARGUMENT, "OP_RESULT: no background operation since power-on or "
                            "SOFT_RESET", record=False)
        if operation.state == OpState.RUNNING:
            raise ChipError(ErrorCode.BUSY, f"OP_RESULT: {operation.describe()} is still running", record=False)
        if isinstance(operation.result, ChipError):
            raise ChipError(operation.result.code, str(operation.result), record=False)
        return operation.result

    # -- command handlers ----------------------------------------------------------
    def _ping(self, payload: bytes) -> bytes:
        return payload

    def _identify(self, payload: bytes) -> bytes:
        _expect_empty("IDENTIFY", payload)
        return IdentifyReply.build(Identity(CHIP_ID_VALUE, VERSION_VALUE, self.config.geometry, MAX_PAYLOAD))

    def _reg_read(self, payload: bytes) -> bytes:
        addr = _parse_args("REG_READ", RegReadArgs, payload).addr
        return RegReadReply.build(dict(value=self.read_register(addr)))

    def _reg_write(self, payload: bytes) -> bytes:
        args = _parse_args("REG_WRITE", RegWriteArgs, payload)
        self.write_register(args.addr, args.value)
        return b""

    def _buffer_range(self, offset: int, length: int) -> slice:
        if offset < 0 or length < 0 or offset + length > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"buffer range {offset}..{offset + length} outside the "
                            f"{len(self.buffer)}-byte staging buffer")
        return slice(offset, offset + length)

    def _buf_write(self, payload: bytes) -> bytes:
        header, data = _split_header("BUF_WRITE", BufWriteHeader, payload)
        self.buffer[self._buffer_range(header.offset, len(data))] = data
        return b""

    def _buf_read(self, payload: bytes) -> bytes:
        args = _parse_args("BUF_READ", BufReadArgs, payload)
        offset, length = args.offset, args.length
        if length > MAX_PAYLOAD:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"BUF_READ of {length} bytes exceeds the frame maximum {MAX_PAYLOAD}")
        return bytes(self.buffer[self._buffer_range(offset, length)])

    def _program_load(self, payload: bytes) -> bytes:
        args = _parse_args("PROGRAM_LOAD", ProgramLoadArgs, payload)
        c = self.config
        built = (args.weight_bits, args.cell_bits, args.array_rows, args.array_cols)
        if built != (c.weight_bits, c.cell_bits, c.rows, c.cols):
            raise ChipError(ErrorCode.BAD_PROGRAM, f"program compiled for M={built[0]}, K={built[1]}, arrays of "
                            f"{built[2]}x{built[3]}; this chip has M={c.weight_bits}, K={c.cell_bits}, "
                            f"arrays of {c.rows}x{c.cols}")
        code = bytes(self.buffer[self._buffer_range(0, args.length)])
        if zlib.crc32(code) != args.crc:
            raise ChipError(ErrorCode.BAD_PROGRAM, f"code section CRC mismatch over {args.length} staged bytes")
        program = self._parse_program(code)
        problem = self._check_placement(program)
        if problem:
            raise ChipError(ErrorCode.BAD_PROGRAM, problem)
        self.program, self.program_code = program, code
        self._weights_cache.clear()
        self._done()
        return b""

    def _parse_program(self, code: bytes) -> Program:
        c = self.config
        geometry = types.SimpleNamespace(weight_bits=c.weight_bits, cell_bits=c.cell_bits,
                                         array_rows=c.rows, array_cols=c.cols)
        try:
            return parse_code(code, geometry)
        except ProgramFormatError as e:
            raise ChipError(ErrorCode.BAD_PROGRAM, str(e)) from None

    def _program_fetch(self, payload: bytes) -> bytes:
        _expect_empty("PROGRAM_FETCH", payload)
        if self.program_code is None:
            raise ChipError(ErrorCode.NO_PROGRAM, "PROGRAM_FETCH: no program loaded")
        code = self.program_code
        self.buffer[self._buffer_range(0, len(code))] = code
        return ProgramFetchReply.build(dict(length=len(code), crc=zlib.crc32(code)))

    def _check_placement(self, program: Program) -> str | None:
        s = program.slices
        for li, layer in enumerate(program.layers):
            for ti, t in enumerate(layer.tiles):
                where = self.cells.check_region(t.array, t.row, t.col, t.in_count, t.out_count * s)
                if where:
                    return f"layer '{layer.name}' tile {ti}: {where}"
                if t.in_start + t.in_count > layer.in_features or t.out_start + t.out_count > layer.out_features:
                    return f"layer '{layer.name}' tile {ti}: block outside the {layer.in_features}x{layer.out_features} weight"
        for ins in program.instructions:
            if ins.layer >= len(program.layers):
                return f"instruction '{ins.name}' uses layer {ins.layer}, program has {len(program.layers)}"
            if any(t >= len(program.tensors) for t in ins.inputs + ins.outputs):
                return f"instruction '{ins.name}' names a tensor beyond the {len(program.tensors)} declared"
        return None

    def _cells_write(self, payload: bytes) -> Operation:
        args = self._region_args("CELLS_WRITE", CellsWriteArgs, payload)
        r = args.region
        if args.mode not in CellMode._value2member_map_:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"CELLS_WRITE: mode {args.mode} is not 0 (open loop) or 1 (verify)")
        n = r.height * r.width
        k = self.config.cell_bits
        size = packed_size(n, k)
        targets = unpack_cells(bytes(self.buffer[self._buffer_range(0, size)]), 0, (r.height, r.width), k)
        mask = None
        if args.masked:
            mbytes = bytes(self.buffer[self._buffer_range(size, packed_size(n, 1))])
            mask = unpack_cells(mbytes, 0, (r.height, r.width), 1).astype(bool)
        steps = self._write_steps(r, targets, mask, args.mode == CellMode.VERIFY)
        return Operation(Command.CELLS_WRITE, n, _primed(steps))

    def _write_steps(self, r, targets: np.ndarray, mask: np.ndarray | None, verify: bool) -> Steps:
        """Program the region in groups of whole rows, counting each group's pulses as it is done.

        Settings are taken now; the ones a write reads cannot change while it runs in the
        background (REG_WRITE refuses them with BUSY).
        """
        regs, device = self.regs, self.device
        stuck = self.cells.stuck_map(r.array, regs["SEED"], regs["STUCK_RATE"] / Q16, device.g_max)
        tol, max_iter = regs["VERIFY_TOL"] / Q16, regs["VERIFY_MAX_ITER"]
        step = max(1, WRITE_CHUNK_CELLS // r.width)
        total, rows = WriteStats(), 0
        try:
            yield 0
            for r0 in range(0, r.height, step):
                stats = self.cells.program(r.array, r.row + r0, r.col, targets[r0:r0 + step],
                                           None if mask is None else mask[r0:r0 + step], verify=verify,
                                           model=device, rng=self.rng, tol=tol, max_iter=max_iter, stuck=stuck)
                self._count(stats)
                total += stats
                rows = min(r.height, r0 + step)
                if rows < r.height:
                    yield rows * r.width
        except _Abort:
            self._done(IRQ_VERIFY_FAIL if total.verify_failures else 0, done=False)
            kept = f"rows {r.row}..{r.row + rows - 1} programmed" if rows else "no row programmed"
            raise ChipError(ErrorCode.ABORTED, (
                f"CELLS_WRITE aborted after {rows} of {r.height} rows ({rows * r.width} of {r.height * r.width} "
                f"cells) of array {r.array}: {kept}, rows {r.row + rows}..{r.row + r.height - 1} untouched; "
                f"{total.cells} cells selected, {total.write_pulses} write pulses, {total.read_pulses} read pulses, "
                f"{total.verify_failures} verify failures")) from None
        self._done(IRQ_VERIFY_FAIL if total.verify_failures else 0)
        return CellsWriteReply.build(total)

    def _region_args(self, name: str, layout, payload: bytes, last_array: int = 0):
        """Parse a command's fixed-size arguments and check its cell region lies on the chip."""
        args = _parse_args(name, layout, payload)
        r = args.region
        for array in (r.array, r.array + last_array):
            where = self.cells.check_region(array, r.row, r.col, r.height, r.width)
            if where:
                raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {where}")
        return args

    def _account(self, stats: WriteStats) -> None:
        self._count(stats)
        self._done(IRQ_VERIFY_FAIL if stats.verify_failures else 0)

    def _count(self, stats: WriteStats) -> None:
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

    def _done(self, extra_flags: int = 0, done: bool = True) -> None:
        self.regs["IRQ_FLAGS"] |= (IRQ_DONE if done else 0) | extra_flags

    def _cells_read(self, payload: bytes) -> bytes:
        args = self._region_args("CELLS_READ", CellsReadArgs, payload)
        r = args.region
        if args.quantity not in CellQuantity._value2member_map_:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"CELLS_READ: quantity {args.quantity} is not 0, 1 or 2")
        span = self._buffer_range(0, r.height * r.width * 4)
        values = self.cells.read(r.array, r.row, r.col, r.height, r.width, args.quantity, self.device, self.rng)
        self._account(WriteStats(read_pulses=r.height * r.width if args.quantity == CellQuantity.CONDUCTANCE else 0))
        self.buffer[span] = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return CellsReadReply.build(dict(length=span.stop))

    def _cells_erase(self, payload: bytes) -> Operation:
        count = _parse_args("CELLS_ERASE", CellsEraseArgs, payload).arrays
        if count == 0:
            raise ChipError(ErrorCode.BAD_ARGUMENT, "CELLS_ERASE: array count 0")
        r = self._region_args("CELLS_ERASE", CellsEraseArgs, payload, last_array=count - 1).region
        return Operation(Command.CELLS_ERASE, count * r.height, _primed(self._erase_steps(r, count)))

    def _erase_steps(self, r, count: int) -> Steps:
        """Erase array by array, in row groups within an array."""
        step = max(1, ERASE_CHUNK_CELLS // r.width)
        total, done = count * r.height, 0
        try:
            yield 0
            for array in range(r.array, r.array + count):
                for r0 in range(0, r.height, step):
                    rows = min(step, r.height - r0)
                    self.cells.erase(array, 1, r.row + r0, r.col, rows, r.width)
                    done += rows
                    if done < total:
                        yield done
        except _Abort:
            whole, part = divmod(done, r.height)
            raise ChipError(ErrorCode.ABORTED, (
                f"CELLS_ERASE aborted after {done} of {total} rows: region erased in {whole} of {count} arrays "
                f"(from array {r.array})" + (f", and in rows {r.row}..{r.row + part - 1} of array {r.array + whole}"
                                             if part else "") + "; the rest untouched")) from None
        self._done()
        return b""

    def _run_command(self, payload: bytes) -> Operation:
        return self._run(_parse_args("RUN", RunArgs, payload).batch)

    def _infer(self, payload: bytes) -> Operation:
        """RUN on inputs carried in the request, replying with the outputs: one frame each way
        instead of BUF_WRITE, RUN and BUF_READ, for batches whose data fits a frame."""
        header, data = _split_header("INFER", RunArgs, payload)
        batch = header.batch
        program = self._loaded("INFER")
        inputs = _sample_bytes(program, program.inputs) * batch
        if len(data) != inputs:
            raise ChipError(ErrorCode.BAD_LENGTH, f"INFER: batch {batch} takes {inputs} bytes of inputs after the "
                            f"u32 batch, got {len(data)}")
        shapes = 1 + sum(1 + 4 * len(program.tensors[t].shape) for t in program.outputs)  # count, ndim, dims
        outputs = _sample_bytes(program, program.outputs) * batch
        if shapes + outputs > MAX_PAYLOAD:
            raise ChipError(ErrorCode.FRAME_TOO_LARGE, f"INFER: the reply for batch {batch} ({shapes} bytes of shapes, "
                            f"{outputs} of outputs) would exceed the {MAX_PAYLOAD}-byte frame limit; use BUF_WRITE, "
                            f"RUN and BUF_READ")
        return self._run(batch, "INFER", data)

    def _loaded(self, name: str) -> Program:
        if self.program is None:
            raise ChipError(ErrorCode.NO_PROGRAM, f"{name}: no program loaded (PROGRAM_LOAD first)")
        return self.program

    def _run(self, batch: int, name: str = "RUN", inline: memoryview | None = None) -> Operation:
        """Check a run of the loaded program on ``batch`` inputs; its steps run it.

        The inputs are staged in the buffer, or ``inline`` (INFER's request, whose reply then
        carries the outputs after their shapes). Sizes are checked before anything is read
        or written, so a refused run leaves the buffer as it was.
        """
        program = self._loaded(name)
        if not 0 < batch <= LIMITS["RUN_BATCH"]:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name}: batch size {batch} outside 1..{LIMITS['RUN_BATCH']}")
        shapes = [(batch, *program.tensors[tid].shape[1:]) for tid in program.inputs]
        sizes = [4 * math.prod(shape) for shape in shapes]
        if sum(sizes) > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {sum(sizes)} bytes of inputs for batch {batch} exceed "
                            f"the {len(self.buffer)}-byte staging buffer")
        source = self.buffer if inline is None else inline
        offsets = itertools.accumulate(sizes[:-1], initial=0)
        feeds = [np.frombuffer(source, dtype="<f4", count=n // 4, offset=o).reshape(shape)
                 for shape, n, o in zip(shapes, sizes, offsets)]
        command = Command.RUN if inline is None else Command.INFER
        return Operation(command, batch, _primed(self._run_steps(name, program, batch, feeds, inline is not None)))

    def _run_steps(self, name: str, program: Program, batch: int, feeds: list[np.ndarray],
                   inline: bool = False) -> Steps:
        """Run the program on batch slices of RUN_SLICE samples, then write all outputs at once.

        The outputs go over the inputs, so none is written before the last slice has run:
        an aborted or failed run leaves the buffer as it was. A batch up to RUN_SLICE is one
        slice, exactly one executor run.
        """
        product = self._converter_product()
        per_sample = sum(1 for i in program.instructions if i.layer >= 0)
        parts: list[list[np.ndarray]] = []
        done = 0
        try:
            yield 0
            for a in range(0, batch, RUN_SLICE):
                b = min(batch, a + RUN_SLICE)
                try:
                    outs = executor.run(program, [f[a:b] for f in feeds], self._layer_weights, product)
                except executor.ExecutionError as e:
                    raise ChipError(ErrorCode.BAD_ARGUMENT, f"{name}: {e}") from None
                if b - a < batch:
                    for tid, out in zip(program.outputs, outs):
                        if out.ndim == 0 or out.shape[0] != b - a:
                            raise ChipError(ErrorCode.BAD_ARGUMENT, (
                                f"{name}: output '{program.tensors[tid].name}' has shape {out.shape} for a slice of "
                                f"{b - a} samples: its dim 0 is not the batch, so a batch over {RUN_SLICE} "
                                f"cannot run in slices"))
                parts.append(outs)
                done = b
                if done < batch:
                    yield done
        except _Abort:
            self.counters["mvm_ops"] += done * per_sample
            raise ChipError(ErrorCode.ABORTED, f"{name} aborted after {done} of {batch} samples ({-(-done // RUN_SLICE)} "
                            f"slices of {RUN_SLICE}); no output written, buffer unchanged") from None
        outputs = parts[0] if len(parts) == 1 else [np.concatenate(group) for group in zip(*parts)]
        data = b"".join(np.ascontiguousarray(out, dtype="<f4").tobytes() for out in outputs)
        if len(data) > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {len(data)} bytes of outputs for batch {batch} exceed "
                            f"the {len(self.buffer)}-byte staging buffer")
        self.buffer[:len(data)] = data
        self.counters["mvm_ops"] += batch * per_sample
        self._done()
        return build_output_shapes([o.shape for o in outputs]) + (data if inline else b"")

    def _converter_product(self) -> LayerProduct | None:
        """Tile-by-tile products when any array the program uses has finite converters."""
        if self._all_ideal:
            return None
        if self._arrays_used[0] is not self.program:  # once per program, not on every run
            used = np.unique([t.array for layer in self.program.layers for t in layer.tiles]).astype(np.intp)
            self._arrays_used = (self.program, used)
        used = self._arrays_used[1]
        if not (self.dac_bits[used].any() or self.adc_bits[used].any()):
            return None
        s, layers = self.program.slices, self.program.layers

        def conductance(layer: int, i: int) -> np.ndarray:
            t = layers[layer].tiles[i]
            return self.cells.g[t.array, t.row:t.row + t.in_count, t.col:t.col + t.out_count * s]

        return tiled_product(self.program, conductance, self.dac_bits, self.adc_bits)

    def _layer_weights(self, index: int) -> np.ndarray:
        """Effective weights of a layer from the programmed conductances, cached per cell generation."""
        gen = self.cells.generation
        hit = self._weights_cache.get(index)
        if hit is not None and hit[0] == gen:
            return hit[1]
        program = self.program
        tiles = program.layers[index].tiles
        s = program.slices

        def conductance(i: int) -> np.ndarray:
            t = tiles[i]
            return self.cells.g[t.array, t.row:t.row + t.in_count, t.col:t.col + t.out_count * s]

        w = effective_weights(program, index, conductance)
        self._weights_cache[index] = (gen, w)
        return w

    _HANDLERS = {
        Command.PING: _ping, Command.IDENTIFY: _identify,
        Command.REG_READ: _reg_read, Command.REG_WRITE: _reg_write,
        Command.BUF_WRITE: _buf_write, Command.BUF_READ: _buf_read,
        Command.PROGRAM_LOAD: _program_load, Command.PROGRAM_FETCH: _program_fetch,
        Command.CELLS_WRITE: _cells_write, Command.CELLS_READ: _cells_read, Command.CELLS_ERASE: _cells_erase,
        Command.RUN: _run_command, Command.INFER: _infer, Command.OP_RESULT: _op_result,
    }


def _sample_bytes(program: Program, tensors: list[int]) -> int:
    """Bytes of one sample of ``tensors`` (f32, batch dimension excluded)."""
    return sum(4 * math.prod(program.tensors[t].shape[1:]) for t in tensors)


def _expect_empty(name: str, payload: bytes) -> None:
    if payload:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: takes no payload, got {len(payload)} bytes")


def _parse_args(name: str, layout, payload: bytes):
    """Parse a command's fixed-size argument struct, or refuse a payload of the wrong size."""
    try:
        return parse_fixed(layout, payload)
    except PayloadError as e:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: {e}") from None


def _split_header(name: str, layout, payload: bytes):
    """A command's fixed-size header and the bulk data after it, or refuse a payload too short for it."""
    try:
        return split_header(layout, payload)
    except PayloadError as e:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: {e}") from None
