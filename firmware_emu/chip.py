"""The emulated chip: register file, staging buffer, cell arrays, executor, command handler.

A transport hands raw bytes to ``Chip.feed`` and sends back what it returns. Every frame
gets a reply; a frame that repeats the previous sequence number is answered from a cache
without running again, so a host may retransmit any command safely.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import zlib
from dataclasses import dataclass

import numpy as np

from . import executor
from .converters import LayerProduct, tiled_product
from .crossbar import CellArrays, ProgramStats
from .nvm_image import NvmImage
from .physics import DeviceModel, pulse_cost
from .program_format import Program, ProgramFormatError, packed_size, parse_code, unpack_cells
from .protocol import (FLAG_ERROR, FLAG_RESPONSE, MAX_PAYLOAD, CellMode, CellQuantity,
                       CellsEraseArgs, CellsReadArgs, CellsWriteArgs, CellsWriteReply, Command, ErrorCode, Frame,
                       FrameError, FrameReader, IdentifyReply, ProgramLoadArgs, encode, error_payload)
from .registers import (ALL_ARRAYS, BY_OFFSET, CHIP_ID_VALUE, DEFAULT_BUILD, LIMITS, Q16, REGISTERS, VERSION_VALUE, Access,
                        DeviceModelCode)


class ChipError(Exception):
    """A command the chip refuses; becomes an error reply with ``code``."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


MAX_DAC_BITS, MAX_ADC_BITS = 16, 24


@dataclass
class ChipConfig:
    """Build-time parameters of a chip (what a datasheet's ordering code fixes)."""

    arrays: int = DEFAULT_BUILD["arrays"]
    rows: int = DEFAULT_BUILD["rows"]
    cols: int = DEFAULT_BUILD["cols"]
    weight_bits: int = DEFAULT_BUILD["weight_bits"]
    cell_bits: int = DEFAULT_BUILD["cell_bits"]
    buffer_size: int = DEFAULT_BUILD["buffer_size"]
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
        if self.cell_bits not in (1, 2, 4, 8) or self.weight_bits % self.cell_bits:
            raise ValueError(f"cell_bits={self.cell_bits} must be 1, 2, 4 or 8 and divide weight_bits={self.weight_bits}")
        for name in ("arrays", "rows", "cols"):
            if not 0 < getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name}={getattr(self, name)} must be in 1..65535")
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


GEOMETRY = ("arrays", "rows", "cols", "weight_bits", "cell_bits", "buffer_size")

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
        clash = [f"{k}={explicit[k]} (image has {getattr(stored, k)})" for k in GEOMETRY
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
        self.counters = {name: 0 for name in COUNTERS}
        self.program: Program | None = self._parse_program(self.program_code) if self.program_code else None
        self._weights_cache.clear()
        self.rng = np.random.default_rng(self.regs["SEED"])

    @property
    def device(self) -> DeviceModel:
        return DeviceModel(cell_bits=self.config.cell_bits, sigma=self.regs["SIGMA"] / Q16,
                           model=DeviceModelCode(self.regs["DEVICE_MODEL"]),
                           read_noise=self.regs["READ_NOISE"] / Q16, clip=bool(self.regs["CONFIG"] & 1))

    def _status(self) -> int:
        return self.regs["STATUS"] & ~0b100 | (0b100 if self.program is not None else 0)

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
        if reg.access == Access.W1C:
            self.regs[name] &= ~value
        elif name == "CONTROL":
            if value & 2 and self.program is None:  # refuse before the reset, so nothing changes
                raise ChipError(ErrorCode.NO_PROGRAM, "CONTROL.START: no program loaded (PROGRAM_LOAD first)")
            if value & 1:
                self.power_on()
            if value & 2:
                self._run(self.regs["RUN_BATCH"])
        elif name == "ARRAY_CONVERTERS":
            dac, adc = value & 0xFF, (value >> 8) & 0xFF
            if value >> 16 or dac > MAX_DAC_BITS or adc > MAX_ADC_BITS:
                raise ChipError(ErrorCode.BAD_ARGUMENT, f"ARRAY_CONVERTERS value 0x{value:X}: DAC_BITS must be "
                                f"0..{MAX_DAC_BITS}, ADC_BITS 0..{MAX_ADC_BITS}, upper bits 0; register unchanged")
            a = self.regs["ARRAY_SELECT"]
            target = slice(None) if a == ALL_ARRAYS else a
            self.dac_bits[target], self.adc_bits[target] = dac, adc
        else:
            self._check_setting(name, value)
            self.regs[name] = value
            if name == "SEED":
                self.rng = np.random.default_rng(value)

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
        self.regs["STATUS"] |= 0x10
        self.regs["ERROR_ADDR"] = addr
        raise ChipError(code, message)

    # -- frames --------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the reply bytes (possibly empty)."""
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
        key = (frame.seq, frame.command, zlib.crc32(frame.payload))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            if frame.flags & FLAG_RESPONSE:
                raise ChipError(ErrorCode.BAD_ARGUMENT, "frame has the RESPONSE flag set: the chip takes requests only")
            code_before = self.program_code
            payload = self.execute(frame.command, frame.payload)
            if self.image is not None and (self.cells.dirty or self.program_code is not code_before):
                self._commit(self.cells.dirty, self.program_code is not code_before)
            self.cells.dirty = set()
            reply = encode(frame.command, frame.seq, payload, FLAG_RESPONSE)
            self.regs["STATUS"] &= ~0b1000
        except Exception as e:  # every frame gets a reply; a fault inside the chip is INTERNAL
            if not isinstance(e, ChipError):
                e = ChipError(ErrorCode.INTERNAL, f"internal fault: {type(e).__name__}: {e}")
            self.cells.dirty = set()
            self.regs["STATUS"] |= 0b1000
            self.regs["ERROR_CODE"] = int(e.code)
            self.regs["IRQ_FLAGS"] |= 0b10
            reply = encode(frame.command, frame.seq, error_payload(e.code, str(e)), FLAG_RESPONSE | FLAG_ERROR)
        self._last = (key, reply)
        return reply

    def execute(self, command: int, payload: bytes) -> bytes:
        """Run one command; raise ChipError for anything the chip refuses."""
        handler = self._HANDLERS.get(command)
        if handler is None:
            raise ChipError(ErrorCode.UNKNOWN_COMMAND, f"unknown command 0x{command:02X}")
        try:
            return handler(self, payload)
        except struct.error as e:
            name = Command(command).name
            raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: payload of {len(payload)} bytes is malformed ({e})") from None

    # -- command handlers ----------------------------------------------------------
    def _ping(self, payload: bytes) -> bytes:
        return payload

    def _identify(self, payload: bytes) -> bytes:
        _expect_empty("IDENTIFY", payload)
        c = self.config
        return IdentifyReply.build(dict(chip_id=CHIP_ID_VALUE, version=VERSION_VALUE, arrays=c.arrays,
                                        rows=c.rows, cols=c.cols, weight_bits=c.weight_bits,
                                        cell_bits=c.cell_bits, buffer_size=c.buffer_size,
                                        max_payload=MAX_PAYLOAD))

    def _reg_read(self, payload: bytes) -> bytes:
        addr, = struct.unpack("<I", payload)
        return struct.pack("<I", self.read_register(addr))

    def _reg_write(self, payload: bytes) -> bytes:
        addr, value = struct.unpack("<II", payload)
        self.write_register(addr, value)
        return b""

    def _buffer_range(self, offset: int, length: int) -> slice:
        if offset < 0 or length < 0 or offset + length > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"buffer range {offset}..{offset + length} outside the "
                            f"{len(self.buffer)}-byte staging buffer")
        return slice(offset, offset + length)

    def _buf_write(self, payload: bytes) -> bytes:
        offset, = struct.unpack_from("<I", payload)
        self.buffer[self._buffer_range(offset, len(payload) - 4)] = memoryview(payload)[4:]
        return b""

    def _buf_read(self, payload: bytes) -> bytes:
        offset, length = struct.unpack("<II", payload)
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
        return struct.pack("<II", len(code), zlib.crc32(code))

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

    def _cells_write(self, payload: bytes) -> bytes:
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
        regs, device = self.regs, self.device
        stuck = self.cells.stuck_map(r.array, regs["SEED"], regs["STUCK_RATE"] / Q16, device.g_max)
        stats = self.cells.program(r.array, r.row, r.col, targets, mask,
                                   verify=args.mode == CellMode.VERIFY, model=device, rng=self.rng,
                                   tol=regs["VERIFY_TOL"] / Q16, max_iter=regs["VERIFY_MAX_ITER"], stuck=stuck)
        self._account(stats)
        return CellsWriteReply.build(dict(cells=stats.cells, write_pulses=stats.write_pulses,
                                          read_pulses=stats.read_pulses, verify_failures=stats.verify_failures))

    def _region_args(self, name: str, layout, payload: bytes, last_array: int = 0):
        """Parse a command's fixed-size arguments and check its cell region lies on the chip."""
        args = _parse_args(name, layout, payload)
        r = args.region
        for array in (r.array, r.array + last_array):
            where = self.cells.check_region(array, r.row, r.col, r.height, r.width)
            if where:
                raise ChipError(ErrorCode.BAD_ADDRESS, f"{name}: {where}")
        return args

    def _account(self, stats: ProgramStats) -> None:
        c = self.counters
        c["write_pulses"] += stats.write_pulses
        c["read_pulses"] += stats.read_pulses
        c["verify_iters"] += stats.verify_iterations
        c["verify_fails"] += stats.verify_failures
        c["cells_written"] += stats.cells
        busy, energy = pulse_cost(stats.write_pulses, stats.read_pulses)
        c["busy_ns"] += busy
        c["energy_pj"] += energy
        self._done(0b100 if stats.verify_failures else 0)

    def _done(self, extra_flags: int = 0) -> None:
        self.regs["IRQ_FLAGS"] |= 0b1 | extra_flags

    def _cells_read(self, payload: bytes) -> bytes:
        args = self._region_args("CELLS_READ", CellsReadArgs, payload)
        r = args.region
        if args.quantity not in CellQuantity._value2member_map_:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"CELLS_READ: quantity {args.quantity} is not 0, 1 or 2")
        span = self._buffer_range(0, r.height * r.width * 4)
        values = self.cells.read(r.array, r.row, r.col, r.height, r.width, args.quantity, self.device, self.rng)
        self._account(ProgramStats(read_pulses=r.height * r.width if args.quantity == CellQuantity.CONDUCTANCE else 0))
        self.buffer[span] = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return struct.pack("<I", span.stop)

    def _cells_erase(self, payload: bytes) -> bytes:
        count = _parse_args("CELLS_ERASE", CellsEraseArgs, payload).arrays
        if count == 0:
            raise ChipError(ErrorCode.BAD_ARGUMENT, "CELLS_ERASE: array count 0")
        args = self._region_args("CELLS_ERASE", CellsEraseArgs, payload, last_array=count - 1)
        r = args.region
        self.cells.erase(r.array, args.arrays, r.row, r.col, r.height, r.width)
        self._done()
        return b""

    def _run_command(self, payload: bytes) -> bytes:
        batch, = struct.unpack("<I", payload)
        return self._run(batch)

    def _run(self, batch: int) -> bytes:
        """Run the loaded program on ``batch`` staged inputs; outputs replace them in the buffer.

        Returns the output count and shapes (the RUN reply). Sizes are checked before
        anything is read or written, so a refused run leaves the buffer as it was.
        """
        program = self.program
        if program is None:
            raise ChipError(ErrorCode.NO_PROGRAM, "RUN: no program loaded (PROGRAM_LOAD first)")
        if not 0 < batch <= LIMITS["RUN_BATCH"]:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"RUN: batch size {batch} outside 1..{LIMITS['RUN_BATCH']}")
        shapes = [(batch, *program.tensors[tid].shape[1:]) for tid in program.inputs]
        sizes = [4 * int(np.prod(shape)) for shape in shapes]
        if sum(sizes) > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"RUN: {sum(sizes)} bytes of inputs for batch {batch} exceed "
                            f"the {len(self.buffer)}-byte staging buffer")
        offsets = np.cumsum([0, *sizes])
        feeds = [np.frombuffer(self.buffer, dtype="<f4", count=n // 4, offset=int(o)).reshape(shape)
                 for shape, n, o in zip(shapes, sizes, offsets)]
        try:
            outputs = executor.run(program, feeds, self._layer_weights, self._converter_product())
        except executor.ExecutionError as e:
            raise ChipError(ErrorCode.BAD_ARGUMENT, f"RUN: {e}") from None
        data = b"".join(np.ascontiguousarray(out, dtype="<f4").tobytes() for out in outputs)
        if len(data) > len(self.buffer):
            raise ChipError(ErrorCode.BAD_ADDRESS, f"RUN: {len(data)} bytes of outputs for batch {batch} exceed "
                            f"the {len(self.buffer)}-byte staging buffer")
        self.buffer[:len(data)] = data
        self.counters["mvm_ops"] += batch * sum(1 for i in program.instructions if i.layer >= 0)
        self._done()
        return struct.pack("<B", len(outputs)) + b"".join(struct.pack(f"<B{o.ndim}I", o.ndim, *o.shape)
                                                           for o in outputs)

    def _converter_product(self) -> LayerProduct | None:
        """Tile-by-tile products when any array the program uses has finite converters."""
        used = [t.array for layer in self.program.layers for t in layer.tiles]
        if not used or not (self.dac_bits[used].any() or self.adc_bits[used].any()):
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

        w = executor.effective_weights(program, index, conductance)
        self._weights_cache[index] = (gen, w)
        return w

    _HANDLERS = {
        Command.PING: _ping, Command.IDENTIFY: _identify,
        Command.REG_READ: _reg_read, Command.REG_WRITE: _reg_write,
        Command.BUF_WRITE: _buf_write, Command.BUF_READ: _buf_read,
        Command.PROGRAM_LOAD: _program_load, Command.PROGRAM_FETCH: _program_fetch,
        Command.CELLS_WRITE: _cells_write, Command.CELLS_READ: _cells_read, Command.CELLS_ERASE: _cells_erase,
        Command.RUN: _run_command,
    }


def _expect_empty(name: str, payload: bytes) -> None:
    if payload:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: takes no payload, got {len(payload)} bytes")


def _parse_args(name: str, layout, payload: bytes):
    """Parse a command's fixed-size argument struct, or refuse a payload of the wrong size."""
    if len(payload) != layout.sizeof():
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: payload is {len(payload)} bytes, expected {layout.sizeof()}")
    return layout.parse(payload)
