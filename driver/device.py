"""Low-level access to one chip: registers, staging buffer, cells, programs, inference.

This is what firmware developers and bench scripts use; ``driver.load`` builds on it.
"""

from __future__ import annotations

import os
import struct
import types
import zlib
from dataclasses import dataclass

import numpy as np
import serial
from tqdm import tqdm

import firmware_emu  # noqa: F401  (registers the emu:// URL scheme with pyserial)
from compiler import Target
from firmware_emu.program_format import Program, pack_cells, parse_code
from firmware_emu.protocol import (CellMode, CellQuantity, CellsEraseArgs, CellsReadArgs,
                                   CellsWriteArgs, CellsWriteReply, Command, IdentifyReply, ProgramLoadArgs)
from firmware_emu.registers import BY_NAME, lookup

from .errors import InvalidArgument, LinkError, LinkTimeout, ProtocolError
from .link import Link

DEFAULT_DEVICE = "emu://"
MAX_CHUNK = 256 << 10  # bytes per staging-buffer frame on a clean link
MIN_CHUNK = 256        # ... and the least it falls to on a noisy one
PROGRESS_BYTES = 16 << 20  # transfers this large show a progress bar on a terminal


@dataclass(frozen=True)
class Identity:
    chip_id: int
    version: int
    arrays: int
    rows: int
    cols: int
    weight_bits: int
    cell_bits: int
    buffer_size: int
    max_payload: int

    @property
    def target(self) -> Target:
        return Target(self.arrays, self.rows, self.cols, self.weight_bits, self.cell_bits)


@dataclass
class WriteStats:
    cells: int = 0
    write_pulses: int = 0
    read_pulses: int = 0
    verify_failures: int = 0

    def __iadd__(self, other: "WriteStats") -> "WriteStats":
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self


def resolve_device(device: str | None) -> str:
    """The device to use: the argument, else $NVCIM_DEVICE, else an in-process chip."""
    return device or os.environ.get("NVCIM_DEVICE") or DEFAULT_DEVICE


class Device:
    """One chip behind a link. Use ``driver.open(url)`` to get one."""

    def __init__(self, link: Link):
        self.link = link
        self._chunk, self._clean = MAX_CHUNK, 0
        self.identity = self._identify()

    @classmethod
    def open(cls, url: str | None = None, timeout: float = 5.0) -> "Device":
        url = resolve_device(url)
        try:
            port = serial.serial_for_url(url, timeout=timeout)
        except (serial.SerialException, ValueError) as e:
            raise LinkError(f"cannot open device {url!r}: {e}") from None
        return cls(Link(port, timeout=timeout))

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- identity and registers -----------------------------------------------------
    def _identify(self) -> Identity:
        reply = self.link.transact(Command.IDENTIFY)
        fields = IdentifyReply.parse(reply)
        return Identity(**{k: v for k, v in fields.items() if not k.startswith("_")})

    def _address(self, register: str | int) -> int:
        if isinstance(register, int):
            return register
        try:
            return lookup(register).offset
        except KeyError as e:
            raise InvalidArgument(str(e.args[0])) from None

    def read_register(self, register: str | int) -> int:
        reply = self.link.transact(Command.REG_READ, struct.pack("<I", self._address(register)))
        return struct.unpack("<I", reply)[0]

    def write_register(self, register: str | int, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise InvalidArgument(f"register value {value} does not fit 32 bits")
        self.link.transact(Command.REG_WRITE, struct.pack("<II", self._address(register), value))

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

    # -- staging buffer -------------------------------------------------------------
    def buffer_write(self, data: bytes, offset: int = 0) -> None:
        view = memoryview(data)
        self._chunked(len(view), lambda pos, n, retries: self.link.transact(
            Command.BUF_WRITE, struct.pack("<I", offset + pos) + bytes(view[pos:pos + n]), retries=retries))

    def buffer_read(self, length: int, offset: int = 0) -> bytes:
        parts: list[bytes] = []
        self._chunked(length, lambda pos, n, retries: parts.append(self.link.transact(
            Command.BUF_READ, struct.pack("<II", offset + pos, n), retries=retries)))
        return b"".join(parts)

    def _chunked(self, length: int, transfer) -> None:
        """Move ``length`` bytes in frames sized to the link's health.

        Both buffer commands are idempotent, so a chunk that keeps failing is simply
        re-sent in smaller pieces: on a noisy link (bytes flipped, dropped, duplicated)
        the frame size falls until frames get through, and grows again once they do.
        """
        pos = 0
        bar = tqdm(total=length, unit="B", unit_scale=True, desc="transfer", leave=False,
                   disable=True if length < PROGRESS_BYTES else None)
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
            bar.update(n)
            if self.link.retransmissions > before:
                self._chunk, self._clean = max(MIN_CHUNK, self._chunk // 2), 0
            else:
                self._clean += 1
                if self._clean >= 4:
                    self._chunk, self._clean = min(MAX_CHUNK, self._chunk * 2), 0
        bar.close()

    # -- programs and cells ---------------------------------------------------------
    def load_code(self, program: Program) -> None:
        """Upload and load the code section of ``program`` (the cells are written separately)."""
        code = program.code_bytes()
        self.buffer_write(code)
        self.link.transact(Command.PROGRAM_LOAD, ProgramLoadArgs.build(dict(
            length=len(code), crc=zlib.crc32(code), weight_bits=program.weight_bits, cell_bits=program.cell_bits,
            array_rows=program.array_rows, array_cols=program.array_cols)))

    def fetch_program(self) -> Program:
        """The code section the chip holds (layers, tiles, instructions; no cell image)."""
        length, crc = struct.unpack("<II", self.link.transact(Command.PROGRAM_FETCH))
        code = self.buffer_read(length)
        if zlib.crc32(code) != crc:
            raise ProtocolError(f"PROGRAM_FETCH: {length} bytes read back with a CRC mismatch")
        ident = self.identity
        geometry = types.SimpleNamespace(weight_bits=ident.weight_bits, cell_bits=ident.cell_bits,
                                         array_rows=ident.rows, array_cols=ident.cols)
        return parse_code(code, geometry)

    def write_cells(self, array: int, row: int, col: int, targets: np.ndarray, *,
                    verify: bool = False, mask: np.ndarray | None = None) -> WriteStats:
        """Program a rectangle of cells to ``targets``; with ``mask``, only the cells it marks."""
        targets = np.asarray(targets)
        if targets.ndim != 2:
            raise InvalidArgument(f"targets must be a 2-D array of cell states, got shape {targets.shape}")
        if mask is not None and np.shape(mask) != targets.shape:
            raise InvalidArgument(f"mask shape {np.shape(mask)} differs from targets shape {targets.shape}")
        k = self.identity.cell_bits
        if targets.size and (targets.min() < 0 or targets.max() >= 1 << k):
            raise InvalidArgument(f"cell targets must lie in 0..{(1 << k) - 1} for {k}-bit cells")
        h, w = targets.shape
        rows_per_op = max(1, (self.identity.buffer_size * 8) // (w * (k + 1)))
        total = WriteStats()
        for r0 in range(0, h, rows_per_op):
            t = targets[r0:r0 + rows_per_op]
            data = pack_cells(t, k)
            if mask is not None:
                data += pack_cells(np.asarray(mask[r0:r0 + rows_per_op], dtype=np.uint8), 1)
            self.buffer_write(data)
            args = CellsWriteArgs.build(dict(region=dict(array=array, row=row + r0, col=col, height=t.shape[0], width=w),
                                             mode=CellMode.VERIFY if verify else CellMode.OPEN_LOOP,
                                             masked=int(mask is not None)))
            reply = CellsWriteReply.parse(self.link.transact(Command.CELLS_WRITE, args))
            total += WriteStats(reply.cells, reply.write_pulses, reply.read_pulses, reply.verify_failures)
        return total

    def read_cells(self, array: int, row: int, col: int, height: int, width: int,
                   quantity: CellQuantity = CellQuantity.CONDUCTANCE) -> np.ndarray:
        """Read a rectangle of cells: conductance (a real read), captured noise, or target."""
        rows_per_op = max(1, self.identity.buffer_size // (4 * width))
        parts = []
        for r0 in range(0, height, rows_per_op):
            n = min(rows_per_op, height - r0)
            args = CellsReadArgs.build(dict(region=dict(array=array, row=row + r0, col=col, height=n, width=width),
                                            quantity=quantity))
            length, = struct.unpack("<I", self.link.transact(Command.CELLS_READ, args))
            parts.append(np.frombuffer(self.buffer_read(length), dtype="<f4").reshape(n, width))
        return np.concatenate(parts)

    def erase(self, array: int = 0, row: int = 0, col: int = 0, height: int | None = None,
              width: int | None = None, arrays: int = 1) -> None:
        """Erase a region (default: whole arrays) to g = 0."""
        ident = self.identity
        args = CellsEraseArgs.build(dict(region=dict(array=array, row=row, col=col,
                                                     height=ident.rows - row if height is None else height,
                                                     width=ident.cols - col if width is None else width),
                                         arrays=arrays))
        self.link.transact(Command.CELLS_ERASE, args)

    def erase_all(self) -> None:
        self.erase(0, arrays=self.identity.arrays)

    # -- inference ------------------------------------------------------------------
    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """Run the loaded program on one batch (inputs already checked by the caller)."""
        batch = feeds[0].shape[0]
        self.buffer_write(b"".join(np.ascontiguousarray(f, dtype="<f4").tobytes() for f in feeds))
        reply = self.link.transact(Command.RUN, struct.pack("<I", batch))
        count, pos = reply[0], 1
        shapes = []
        for _ in range(count):
            ndim = reply[pos]
            shapes.append(struct.unpack_from(f"<{ndim}I", reply, pos + 1))
            pos += 1 + 4 * ndim
        sizes = [int(np.prod(s)) * 4 for s in shapes]
        data = self.buffer_read(sum(sizes))
        outs, offset = [], 0
        for shape, size in zip(shapes, sizes):
            outs.append(np.frombuffer(data, dtype="<f4", count=size // 4, offset=offset).reshape(shape).copy())
            offset += size
        return outs
