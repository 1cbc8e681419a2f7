"""Low-level access to one chip: registers, staging buffer, cells, programs, inference.

This is what firmware developers and bench scripts use; ``driver.load`` builds on it.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
import types
import zlib
from collections.abc import Callable
from typing import Generic, Literal, TypeVar, overload

import numpy as np
import serial
from tqdm import tqdm

from nvcim.firmware_emu.contract.access import split_token, token_line
from nvcim.firmware_emu.contract.program_format import Program, pack_cells, parse_code
from nvcim.firmware_emu.contract.protocol import (
    FLAG_ASYNC,
    BufReadArgs,
    BufWriteHeader,
    CellMode,
    CellQuantity,
    CellsEraseArgs,
    CellsReadArgs,
    CellsReadReply,
    CellsWriteArgs,
    CellsWriteReply,
    Command,
    ErrorCode,
    IdentifyReply,
    Identity,
    ProgramFetchReply,
    ProgramLoadArgs,
    RegReadArgs,
    RegReadReply,
    RegWriteArgs,
    RunArgs,
    WriteStats,
    parse_fixed,
    parse_output_shapes,
)
from nvcim.firmware_emu.contract.registers import BY_NAME, OpState, field, lookup

from .default_device import resolve_device
from .errors import DeviceError, InvalidArgument, LinkError, LinkTimeout, OperationTimeout, ProtocolError
from .link import Link


def _register_url_handlers() -> None:
    """Let pyserial open the URL schemes of installed backends (``emu://``) without importing them.

    Each ``nvcim.url_handlers`` entry point names a package holding pyserial's
    ``protocol_<scheme>`` modules; pyserial imports the module the first time a URL of
    that scheme is opened.
    """
    for entry in importlib.metadata.entry_points(group="nvcim.url_handlers"):
        if entry.value not in serial.protocol_handler_packages:
            serial.protocol_handler_packages.append(entry.value)


_register_url_handlers()
MAX_CHUNK = 256 << 10  # bytes per staging-buffer frame on a clean link
MIN_CHUNK = 256        # ... and the least it falls to on a noisy one
INFER_ANY = 1 << 32  # (no batch size refused yet)
PROGRESS_BYTES = 16 << 20  # transfers this large show a progress bar on a terminal

T = TypeVar("T")


_STATUS_BUSY = field("STATUS", "BUSY").mask
_CONTROL_START, _CONTROL_ABORT = field("CONTROL", "START").mask, field("CONTROL", "ABORT").mask
_OP_COMMAND, _OP_STATE = field("OP_STATUS", "COMMAND"), field("OP_STATUS", "STATE")


class Operation(Generic[T]):
    """A long command running on the chip in the background (FLAG_ASYNC or CONTROL.START).

    While it runs the chip still answers registers, so a host can watch ``progress``,
    ``abort()`` it, or ``wait()`` for its result; other commands are refused with BUSY.
    """

    def __init__(self, device: Device, command: Command, parse: Callable[[bytes], T],
                 reply: bytes | None = None):
        self.device, self.command, self._parse = device, command, parse
        self._reply = reply          # the result's payload once fetched (or a chip that ran it at once)
        self._result: tuple[T] | None = None

    def _state(self) -> OpState:
        value = self.device.read_register("OP_STATUS")
        command = (value & _OP_COMMAND.mask) >> _OP_COMMAND.lsb
        if command != self.command:
            raise ProtocolError(f"{self.command.name}: the chip's background operation is now "
                                f"{'none' if command == 0 else f'command 0x{command:02X}'} (another host, "
                                f"or a SOFT_RESET, replaced it)")
        return OpState((value & _OP_STATE.mask) >> _OP_STATE.lsb)

    @property
    def busy(self) -> bool:
        """Still running on the chip."""
        return self._reply is None and self._state() == OpState.RUNNING

    @property
    def progress(self) -> tuple[int, int]:
        """(units done, units in all): cells for a write, array rows for an erase, samples for a run."""
        return self.device.read_register("OP_PROGRESS"), self.device.read_register("OP_TOTAL")

    def wait(self, timeout: float | None = None, poll: float = 0.01) -> T:
        """Block until the operation ends and return its result (what the synchronous call returns).

        Raises DeviceError with code ABORTED if it was aborted (the message says how much
        was done), the operation's own DeviceError if it failed, and OperationTimeout (a
        LinkTimeout) if it still runs after ``timeout`` seconds; it then goes on running.
        """
        if self._result is not None:
            return self._result[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._reply is None and self._state() == OpState.RUNNING:
            if deadline is not None and time.monotonic() >= deadline:
                done, total = self.progress
                raise OperationTimeout(f"{self.command.name} still running after {timeout:g} s ({done} of {total} "
                                       f"done); wait() again or abort() it")
            time.sleep(poll)
        if self._reply is None:
            try:
                self._reply = self.device.link.transact(Command.OP_RESULT)
            except DeviceError as e:  # name the operation that failed, not the query
                raise DeviceError(f"{self.command.name} (background)", e.code, e.chip_message, e.status) from None
        self._result = (self._parse(self._reply),)
        return self._result[0]

    def abort(self) -> None:
        """Stop the operation at the chip's next chunk boundary; finished chunks are kept."""
        if self._reply is None:
            self.device.abort()


class Device:
    """One chip behind a link. Use ``driver.open(url)`` to get one."""

    def __init__(self, link: Link):
        self.link = link
        self._chunk, self._clean = MAX_CHUNK, 0
        self._infer_below = INFER_ANY  # batches of this size and up are not sent as INFER
        self.identity = self._identify()

    @classmethod
    def open(cls, url: str | None = None, timeout: float = 5.0) -> Device:
        url = resolve_device(url)
        try:
            url, token = split_token(url)  # socket://HOST:PORT?token=T: the token line goes first, not to pyserial
            port = serial.serial_for_url(url, timeout=timeout)
            if token is not None:
                port.write(token_line(token))
        except (serial.SerialException, ValueError) as e:
            raise LinkError(f"cannot open device {url!r}: {e}") from None
        try:
            return cls(Link(port, timeout=timeout))
        except BaseException:  # e.g. a served chip another host holds (BUSY): hang up, do not hold a connection
            port.close()
            raise

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- identity and registers -----------------------------------------------------
    def _identify(self) -> Identity:
        reply = self.link.transact(Command.IDENTIFY)
        try:
            return parse_fixed(IdentifyReply, reply)
        except ValueError as e:  # a reply of the wrong size, or a geometry no chip can have
            raise ProtocolError(f"IDENTIFY: reply not understood: {e}") from None

    def _address(self, register: str | int) -> int:
        if isinstance(register, int):
            return register
        try:
            return lookup(register).offset
        except KeyError as e:
            raise InvalidArgument(str(e.args[0])) from None

    def read_register(self, register: str | int) -> int:
        reply = self.link.transact(Command.REG_READ, RegReadArgs.build(dict(addr=self._address(register))))
        return RegReadReply.parse(reply).value

    def differential(self) -> bool:
        """Whether the chip reads array pairs differentially (ARRAY_CONVERTERS.DIFFERENTIAL as ARRAY_SELECT
        shows it: array 0's under the broadcast select), so programs must be compiled with paired placement."""
        return bool(self.read_register("ARRAY_CONVERTERS") & field("ARRAY_CONVERTERS", "DIFFERENTIAL").mask)

    def write_register(self, register: str | int, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise InvalidArgument(f"register value {value} does not fit 32 bits")
        self.link.transact(Command.REG_WRITE, RegWriteArgs.build(dict(addr=self._address(register), value=value)))

    def counters(self) -> dict[str, int]:
        """All performance counters, 64-bit ones combined."""
        out: dict[str, int] = {}
        for name in BY_NAME:
            if not name.startswith("CNT_") or name.endswith("_HI"):
                continue
            value = self.read_register(name)
            if name.endswith("_LO"):
                value |= self.read_register(name[:-3] + "_HI") << 32
                name = name[:-3]
            out[name[4:].lower()] = value
        return out

    def reset(self) -> None:
        """Soft reset: clears status and counters, settings back to power-on values;
        cells and the loaded program are non-volatile and stay."""
        self.write_register("CONTROL", 1)

    @property
    def clock(self) -> int:
        """The chip's retention clock (CLOCK), seconds: cells drift with the time it shows since
        they were programmed."""
        return self.read_register("CLOCK")

    def advance_time(self, seconds: int) -> int:
        """Let ``seconds`` pass for the cells (a shelf, a deployment's lifetime); returns the new clock.

        Inference and conductance reads then see the drift the device preset predicts
        (docs/device-model.md#drift); reprogramming a cell restarts its drift.
        """
        if not isinstance(seconds, int) or seconds < 0:
            raise InvalidArgument(f"advance_time({seconds!r}): seconds must be a whole number >= 0 (time only "
                                  f"moves forward)")
        now = self.clock + seconds
        if now > 0xFFFFFFFF:
            raise InvalidArgument(f"advance_time({seconds}): the clock would pass 2^32 - 1 s (136 years); it shows "
                                  f"{now - seconds}")
        self.write_register("CLOCK", now)
        return now

    # -- background operations -------------------------------------------------------
    @property
    def busy(self) -> bool:
        """STATUS.BUSY: a background operation runs, and only registers and OP_RESULT are served."""
        return bool(self.read_register("STATUS") & _STATUS_BUSY)

    def abort(self, timeout: float | None = None) -> None:
        """Stop the running background operation at its next chunk boundary, and wait until
        STATUS.BUSY clears (at most ``timeout`` s, default the link's). No-op when none runs."""
        self.write_register("CONTROL", _CONTROL_ABORT)
        deadline = time.monotonic() + (self.link.timeout if timeout is None else timeout)
        while self.busy:
            if time.monotonic() >= deadline:
                raise OperationTimeout("CONTROL.ABORT: the chip is still BUSY after "
                                       f"{self.link.timeout if timeout is None else timeout:g} s")
            time.sleep(0.001)

    def _start(self, command: Command, payload: bytes) -> bytes | None:
        """Send ``command`` with FLAG_ASYNC; None once the chip runs it in the background.

        A chip that ignores the flag replies with the finished command: its payload is
        returned, so the Operation is complete at once. A resent start is answered from
        the chip's reply cache, so it never starts twice.
        """
        reply = self.link.exchange(command, payload, flags=FLAG_ASYNC)
        return None if reply.flags & FLAG_ASYNC else bytes(reply.payload)

    # -- staging buffer -------------------------------------------------------------
    def buffer_write(self, data: bytes, offset: int = 0) -> None:
        view = memoryview(data)
        self._chunked(len(view), lambda pos, n, retries: self.link.transact(
            Command.BUF_WRITE, BufWriteHeader.build(dict(offset=offset + pos)), view[pos:pos + n], retries=retries))

    def buffer_read(self, length: int, offset: int = 0) -> bytes:
        parts: list[bytes] = []
        self._chunked(length, lambda pos, n, retries: parts.append(self.link.transact(
            Command.BUF_READ, BufReadArgs.build(dict(offset=offset + pos, length=n)), retries=retries)))
        return b"".join(parts)

    def _chunked(self, length: int, transfer) -> None:
        """Move ``length`` bytes in frames sized to the link's health.

        Both buffer commands are idempotent, so a chunk that keeps failing is simply
        re-sent in smaller pieces: on a noisy link (bytes flipped, dropped, duplicated)
        the frame size falls until frames get through, and grows again once they do.
        """
        pos = 0
        bar = tqdm(total=length, unit="B", unit_scale=True, desc="transfer", leave=False, disable=None) \
            if length >= PROGRESS_BYTES else None  # (a disabled bar still costs 40 us to make)
        while pos < length:
            n = min(self._chunk, length - pos)
            before = self.link.retransmissions
            small = n <= MIN_CHUNK
            try:
                transfer(pos, n, None if small else 2)
            except (LinkTimeout, ProtocolError):
                if small:
                    raise
                self._chunk, self._clean = max(MIN_CHUNK, n // 4), 0
                continue
            pos += n
            if bar is not None:
                bar.update(n)
            if self.link.retransmissions > before:
                self._chunk, self._clean = max(MIN_CHUNK, self._chunk // 2), 0
            else:
                self._clean += 1
                if self._clean >= 4:
                    self._chunk, self._clean = min(MAX_CHUNK, self._chunk * 2), 0
        if bar is not None:
            bar.close()

    # -- programs and cells ---------------------------------------------------------
    def load_code(self, program: Program) -> None:
        """Upload and load the code section of ``program`` (the cells are written separately)."""
        code = program.code_bytes()
        self.buffer_write(code)
        self.link.transact(Command.PROGRAM_LOAD, ProgramLoadArgs.build(dict(
            length=len(code), crc=zlib.crc32(code), weight_bits=program.weight_bits, cell_bits=program.cell_bits,
            array_rows=program.array_rows, array_cols=program.array_cols)))
        if self._infer_below:  # another program, other output sizes (a chip without INFER stays so)
            self._infer_below = INFER_ANY

    def fetch_program(self) -> Program:
        """The code section the chip holds (layers, tiles, instructions; no cell image)."""
        fetched = ProgramFetchReply.parse(self.link.transact(Command.PROGRAM_FETCH))
        length, crc = fetched.length, fetched.crc
        code = self.buffer_read(length)
        if zlib.crc32(code) != crc:
            raise ProtocolError(f"PROGRAM_FETCH: {length} bytes read back with a CRC mismatch")
        g = self.identity.geometry
        header = types.SimpleNamespace(weight_bits=g.weight_bits, cell_bits=g.cell_bits,
                                       array_rows=g.rows, array_cols=g.cols)
        return parse_code(code, header)

    @overload
    def write_cells(self, array: int, row: int, col: int, targets: np.ndarray, *, verify: bool = ...,
                    mask: np.ndarray | None = ..., background: Literal[False] = ...) -> WriteStats: ...

    @overload
    def write_cells(self, array: int, row: int, col: int, targets: np.ndarray, *, verify: bool = ...,
                    mask: np.ndarray | None = ..., background: Literal[True]) -> Operation[WriteStats]: ...

    def write_cells(self, array: int, row: int, col: int, targets: np.ndarray, *,
                    verify: bool = False, mask: np.ndarray | None = None,
                    background: bool = False) -> WriteStats | Operation[WriteStats]:
        """Program a rectangle of cells to ``targets``; with ``mask``, only the cells it marks.

        ``background=True`` returns at once with an Operation (a long write-verify can then
        be watched and aborted); the region must then fit the staging buffer in one piece.
        """
        targets = np.asarray(targets)
        if targets.ndim != 2:
            raise InvalidArgument(f"targets must be a 2-D array of cell states, got shape {targets.shape}")
        if mask is not None and np.shape(mask) != targets.shape:
            raise InvalidArgument(f"mask shape {np.shape(mask)} differs from targets shape {targets.shape}")
        geometry = self.identity.geometry
        k = geometry.cell_bits
        if targets.size and (targets.min() < 0 or targets.max() >= 1 << k):
            raise InvalidArgument(f"cell targets must lie in 0..{(1 << k) - 1} for {k}-bit cells")
        h, w = targets.shape
        rows_per_op = max(1, (geometry.buffer_size * 8) // (w * (k + 1)))
        if background and h > rows_per_op:
            raise InvalidArgument(f"a background write takes one staging pass: {h} rows of {w} cells do not fit "
                                  f"the {geometry.buffer_size}-byte buffer (at most {rows_per_op} rows)")
        total = WriteStats()
        for r0 in range(0, h, rows_per_op):
            t = targets[r0:r0 + rows_per_op]
            data = pack_cells(t, k)
            if mask is not None:
                data += pack_cells(np.asarray(mask[r0:r0 + rows_per_op], dtype=np.uint8), 1)
            self.buffer_write(data)
            region = dict(array=array, row=row + r0, col=col, height=t.shape[0], width=w)
            args = CellsWriteArgs.build(dict(region=region,
                                             mode=CellMode.VERIFY if verify else CellMode.OPEN_LOOP,
                                             masked=int(mask is not None)))
            if background:
                return Operation(self, Command.CELLS_WRITE, CellsWriteReply.parse,
                                 self._start(Command.CELLS_WRITE, args))
            total += CellsWriteReply.parse(self.link.transact(Command.CELLS_WRITE, args))
        return total

    def read_cells(self, array: int, row: int, col: int, height: int, width: int,
                   quantity: CellQuantity = CellQuantity.CONDUCTANCE) -> np.ndarray:
        """Read a rectangle of cells: conductance (a real read), captured noise, or target."""
        rows_per_op = max(1, self.identity.geometry.buffer_size // (4 * width))
        parts = []
        for r0 in range(0, height, rows_per_op):
            n = min(rows_per_op, height - r0)
            args = CellsReadArgs.build(dict(region=dict(array=array, row=row + r0, col=col, height=n, width=width),
                                            quantity=quantity))
            length = CellsReadReply.parse(self.link.transact(Command.CELLS_READ, args)).length
            parts.append(np.frombuffer(self.buffer_read(length), dtype="<f4").reshape(n, width))
        return np.concatenate(parts)

    def erase(self, array: int = 0, row: int = 0, col: int = 0, height: int | None = None,
              width: int | None = None, arrays: int = 1, background: bool = False) -> Operation[None] | None:
        """Erase a region (default: whole arrays) to g = 0; ``background=True`` returns an Operation."""
        g = self.identity.geometry
        args = CellsEraseArgs.build(dict(region=dict(array=array, row=row, col=col,
                                                     height=g.rows - row if height is None else height,
                                                     width=g.cols - col if width is None else width),
                                         arrays=arrays))
        if background:
            return Operation(self, Command.CELLS_ERASE, lambda _: None, self._start(Command.CELLS_ERASE, args))
        self.link.transact(Command.CELLS_ERASE, args)
        return None

    def erase_all(self) -> None:
        self.erase(0, arrays=self.identity.geometry.arrays)

    # -- inference ------------------------------------------------------------------
    def run(self, feeds: list[np.ndarray],
            background: bool = False) -> list[np.ndarray] | Operation[list[np.ndarray]]:
        """Run the loaded program on one batch (inputs already checked by the caller);
        ``background=True`` returns an Operation whose ``wait()`` gives the outputs.

        A batch whose inputs fit one frame of the size the link currently carries goes in
        one INFER exchange (inputs out, outputs back). A larger one is staged with BUF_WRITE,
        run, and read back, and so is one the link keeps damaging (the frame size then
        falls), one whose outputs the chip says would not fit a reply (remembered for this
        batch size and up), or any on a chip without INFER (remembered). A link timeout is
        raised, as for RUN: the chip may still be computing, and must not run it twice.
        """
        batch = feeds[0].shape[0]
        arrays = [np.ascontiguousarray(f, dtype="<f4") for f in feeds]
        args = RunArgs.build(dict(batch=batch))
        if not background and batch < self._infer_below and 4 + sum(a.nbytes for a in arrays) <= self._chunk:
            before = self.link.retransmissions
            try:
                outputs = _inline_outputs(self.link.transact(Command.INFER, args, *arrays))
                if self.link.retransmissions > before:
                    self._chunk, self._clean = max(MIN_CHUNK, self._chunk // 2), 0
                return outputs
            except ProtocolError:  # frames this size keep arriving damaged: smaller ones below
                self._chunk, self._clean = max(MIN_CHUNK, self._chunk // 4), 0
            except DeviceError as e:
                if e.code == ErrorCode.FRAME_TOO_LARGE:
                    self._infer_below = batch
                elif e.code == ErrorCode.UNKNOWN_COMMAND:
                    self._infer_below = 0
                else:
                    raise
        self.buffer_write(b"".join(a.tobytes() for a in arrays))
        if background:
            return Operation(self, Command.RUN, self._outputs, self._start(Command.RUN, args))
        return self._outputs(self.link.transact(Command.RUN, args))

    def start(self, feeds: list[np.ndarray] | None = None) -> Operation[list[np.ndarray]]:
        """CONTROL.START: run the loaded program in the background on RUN_BATCH staged inputs.

        With ``feeds`` they are staged and RUN_BATCH set first; without, the inputs already
        in the buffer are used. ``wait()`` returns the outputs, as ``run`` does.
        """
        if feeds is not None:
            self.buffer_write(b"".join(np.ascontiguousarray(f, dtype="<f4").tobytes() for f in feeds))
            self.write_register("RUN_BATCH", feeds[0].shape[0])
        self.write_register("CONTROL", _CONTROL_START)
        return Operation(self, Command.RUN, self._outputs)

    def _outputs(self, reply: bytes) -> list[np.ndarray]:
        """Read back the outputs a RUN reply describes."""
        shapes, _ = parse_output_shapes(reply)
        return _split_outputs(self.buffer_read(sum(4 * int(np.prod(s)) for s in shapes)), shapes)


def _split_outputs(data, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Writable float32 arrays of ``shapes``, one after another in ``data``."""
    outs, offset = [], 0
    for shape in shapes:
        count = math.prod(shape)
        outs.append(np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).copy())
        offset += 4 * count
    return outs


def _inline_outputs(reply: bytes) -> list[np.ndarray]:
    """The outputs an INFER reply carries after its RUN-style shape list."""
    shapes, pos = parse_output_shapes(reply)
    return _split_outputs(memoryview(reply)[pos:], shapes)
