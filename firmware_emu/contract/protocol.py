"""The wire protocol between host and chip: framing, commands, error codes.

Frame layout (little endian), documented in docs/protocol.md:

    offset  size  field
    0       2     SYNC 0xA5 0x5A
    2       1     FLAGS   bit0 RESPONSE, bit1 ERROR, bit2 ASYNC
    3       1     COMMAND (Command)
    4       2     SEQ     sequence number chosen by the host, echoed in the reply
    6       4     LENGTH  payload bytes (<= MAX_PAYLOAD)
    10      2     HCRC    CRC-16/CCITT-FALSE of bytes 0..9
    12      N     PAYLOAD
    12+N    4     CRC-32 of the payload

The header has its own CRC so a corrupted LENGTH is caught before the receiver waits for
a payload that never comes; after a bad header the receiver slides one byte and hunts for
the next SYNC. An error reply's payload is ErrorReply: ERROR_CODE (u16), then a UTF-8 message.
"""

from __future__ import annotations

import binascii
import io
import struct
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from functools import cache
from typing import Generic, TypeVar

from construct import Construct, GreedyBytes, Int8ul, Int16ul, Int32ul, Int64ul, PrefixedArray, Struct
from zlib_ng.zlib_ng import crc32  # zlib's CRC-32, computed with SIMD: 4x faster on a frame

from .geometry import Geometry

SYNC = b"\xA5\x5A"
MAX_PAYLOAD = 1 << 20
FLAG_RESPONSE = 0x01
FLAG_ERROR = 0x02
FLAG_ASYNC = 0x04  # request: run CELLS_WRITE / CELLS_ERASE / RUN / INFER in the background (ACK at once)

# the header, declared once for building and parsing: SYNC, FLAGS, COMMAND, SEQ, LENGTH, HCRC
# (a plain struct: frames are the hot path, and construct's parser costs 15 us a frame)
HEADER = struct.Struct("<2sBBHIH")
HEADER_SIZE = HEADER.size
TRAILER_SIZE = 4


class Command(IntEnum):
    PING = 0x01          # payload echoed back
    IDENTIFY = 0x02      # -> IdentifyReply
    REG_READ = 0x10      # RegReadArgs -> RegReadReply
    REG_WRITE = 0x11     # RegWriteArgs
    BUF_WRITE = 0x20     # BufWriteHeader, data: copy data into the staging buffer
    BUF_READ = 0x21      # BufReadArgs -> data
    PROGRAM_LOAD = 0x30  # ProgramLoadArgs: load the code section staged in the buffer
    PROGRAM_FETCH = 0x31  # -> ProgramFetchReply: the loaded code section, copied into the buffer
    CELLS_WRITE = 0x40   # CellsWriteArgs: targets (+ mask) from the buffer -> CellsWriteReply
    CELLS_READ = 0x41    # CellsReadArgs: float32 values into the buffer -> CellsReadReply
    CELLS_ERASE = 0x42   # CellsEraseArgs: erase that region in each array
    RUN = 0x50           # RunArgs: inputs from the buffer, outputs into the buffer -> OutputShapes
    INFER = 0x51         # RunArgs, inputs: RUN on them -> OutputShapes, outputs
    OP_RESULT = 0x60     # -> the last background operation's reply (or its error, or BUSY)


class ErrorCode(IntEnum):
    OK = 0
    BAD_HEADER = 1         # header CRC mismatch
    BAD_CRC = 2            # payload CRC mismatch
    FRAME_TOO_LARGE = 3    # LENGTH > MAX_PAYLOAD
    UNKNOWN_COMMAND = 4
    BAD_LENGTH = 5         # payload size wrong for the command
    BUS_ERROR = 6          # unmapped register address
    READ_ONLY = 7          # write to a read-only register
    BAD_ADDRESS = 8        # cell region or buffer range outside the chip
    BAD_PROGRAM = 9        # program image rejected (CRC, version, geometry)
    NO_PROGRAM = 10        # RUN before PROGRAM_LOAD
    BAD_ARGUMENT = 11      # a field value the command does not accept
    BUSY = 12              # a background operation is running (the message names it)
    ABORTED = 13           # the background operation was stopped by CONTROL.ABORT
    INTERNAL = 15


class CellMode(IntEnum):
    OPEN_LOOP = 0  # one pulse per cell, read-after-write captures the deviation
    VERIFY = 1     # write-verify loop per cell


class CellQuantity(IntEnum):
    CONDUCTANCE = 0  # what a read returns now (g, read noise included)
    NOISE = 1        # deviation captured by the read-after-write of the last programming
    TARGET = 2       # target state of the last programming
    PROGRAM_TIME = 3  # CLOCK value (seconds) when the cell was last programmed or erased, as f32 (exact to 2^24 s)


@dataclass
class WriteStats:
    """What programming cells took: CELLS_WRITE's reply, the chip's count of each chunk, a deploy's total."""

    cells: int = 0            # cells selected and programmed
    write_pulses: int = 0
    read_pulses: int = 0
    verify_failures: int = 0  # cells write-verify left outside tolerance

    @property
    def verify_iterations(self) -> int:
        """Corrective pulses: every programmed cell takes one pulse, write-verify the rest."""
        return self.write_pulses - self.cells

    def __iadd__(self, other: WriteStats) -> WriteStats:
        """Sum the stats of several commands (or of one command's chunks)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass(frozen=True)
class Identity:
    """IDENTIFY's reply: which part this is, its geometry, and the largest payload it accepts."""

    chip_id: int
    version: int
    geometry: Geometry
    max_payload: int
    unique_id: int  # this very chip (UID_HI:UID_LO): tells two boards of one part apart


T = TypeVar("T")


class Record(Generic[T]):
    """A fixed-size payload that parses into a dataclass and is built from one.

    ``nested`` names the fields that are dataclasses themselves (a sub-struct on the wire).
    """

    def __init__(self, layout: Construct, cls: type[T], **nested: type):
        self.layout, self.cls, self.nested = layout, cls, nested

    def sizeof(self) -> int:
        return self.layout.sizeof()

    def build(self, value: T) -> bytes:
        return self.layout.build(asdict(value))

    def parse(self, data: bytes) -> T:
        parsed = self.layout.parse(data)
        return self.cls(**{f.name: self._field(f.name, parsed[f.name]) for f in fields(self.cls)})

    def _field(self, name: str, value):
        cls = self.nested.get(name)
        return value if cls is None else cls(**{f.name: value[f.name] for f in fields(cls)})


# Every payload, declared once: the chip and the host build and parse with the same
# declaration. Compiled (construct's interpreter costs tens of us a parse, on every frame).
# Bulk data after a fixed header (BUF_WRITE's data, INFER's inputs and outputs, BUF_READ's
# reply) is not declared here: it stays raw bytes, read and written with numpy.
CellRegion = Struct("array" / Int32ul, "row" / Int32ul, "col" / Int32ul,
                    "height" / Int32ul, "width" / Int32ul)
CellsWriteArgs = Struct("region" / CellRegion, "mode" / Int8ul, "masked" / Int8ul).compile()
CellsWriteReply = Record(Struct("cells" / Int32ul, "write_pulses" / Int32ul, "read_pulses" / Int32ul,
                                "verify_failures" / Int32ul).compile(), WriteStats)
CellsReadArgs = Struct("region" / CellRegion, "quantity" / Int8ul).compile()
CellsReadReply = Struct("length" / Int32ul).compile()  # bytes of f32 values written to the buffer from offset 0
CellsEraseArgs = Struct("region" / CellRegion, "arrays" / Int32ul).compile()
ProgramLoadArgs = Struct("length" / Int32ul, "crc" / Int32ul, "weight_bits" / Int8ul, "cell_bits" / Int8ul,
                         "array_rows" / Int32ul, "array_cols" / Int32ul).compile()
ProgramFetchReply = Struct("length" / Int32ul, "crc" / Int32ul).compile()  # of the code section now in the buffer
GeometryFields = Struct("arrays" / Int32ul, "rows" / Int32ul, "cols" / Int32ul, "weight_bits" / Int8ul,
                        "cell_bits" / Int8ul, "buffer_size" / Int32ul)
IdentifyReply = Record(Struct("chip_id" / Int32ul, "version" / Int32ul, "geometry" / GeometryFields,
                              "max_payload" / Int32ul, "unique_id" / Int64ul).compile(), Identity, geometry=Geometry)
RegReadArgs = Struct("addr" / Int32ul).compile()
RegReadReply = Struct("value" / Int32ul).compile()
RegWriteArgs = Struct("addr" / Int32ul, "value" / Int32ul).compile()
BufWriteHeader = Struct("offset" / Int32ul).compile()  # then the data
BufReadArgs = Struct("offset" / Int32ul, "length" / Int32ul).compile()  # reply: the data
RunArgs = Struct("batch" / Int32ul).compile()  # RUN's payload; INFER's header, then the inputs
# RUN's reply (INFER's header, then the outputs): output count, then each output's ndim and dims
OutputShapes = PrefixedArray(Int8ul, PrefixedArray(Int8ul, Int32ul)).compile()
ErrorReply = Struct("code" / Int16ul, "message" / GreedyBytes).compile()  # message: UTF-8, no terminator


class PayloadError(ValueError):
    """A payload too short or too long for its declaration."""


@cache
def _size(layout: Construct) -> int:
    """A fixed-size struct's size (construct recomputes it on every sizeof(): ~100 us a frame)."""
    return layout.sizeof()


def parse_fixed(layout: Construct, payload: bytes | memoryview):
    """Parse a payload that is exactly one fixed-size struct."""
    if len(payload) != _size(layout):
        raise PayloadError(f"payload is {len(payload)} bytes, expected {_size(layout)}")
    return layout.parse(bytes(payload))


def split_header(layout: Construct, payload: bytes | memoryview):
    """Parse a fixed-size header; return it and a view of the bulk data after it (not copied)."""
    size = _size(layout)
    if len(payload) < size:
        raise PayloadError(f"payload is {len(payload)} bytes, expected at least {size}")
    view = memoryview(payload)
    return layout.parse(bytes(view[:size])), view[size:]


def build_output_shapes(shapes: list[tuple[int, ...]]) -> bytes:
    return OutputShapes.build([list(shape) for shape in shapes])


def parse_output_shapes(reply: bytes) -> tuple[list[tuple[int, ...]], int]:
    """The shapes a RUN or INFER reply lists, and where the list ends (INFER's outputs start)."""
    stream = io.BytesIO(reply)  # shares the bytes: nothing copied
    shapes = OutputShapes.parse_stream(stream)
    return [tuple(shape) for shape in shapes], stream.tell()


class FrameError(Exception):
    """A frame arrived damaged; carries the error code and, when its header was sound,
    the sequence number and command (else None and 0)."""

    def __init__(self, code: ErrorCode, seq: int | None, message: str, command: int = 0):
        super().__init__(message)
        self.code, self.seq, self.command = code, seq, command


@dataclass
class Frame:
    """One received frame. ``payload`` may be a read-only view into the bytes it arrived in
    (no copy of a large payload): take ``bytes(payload)`` to keep a copy of your own."""

    command: int
    seq: int
    payload: bytes | memoryview
    flags: int = 0
    crc: int = 0  # the payload's CRC-32 as it arrived (a receiver's cheap identity of the payload)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def error(self) -> tuple[int, str]:
        reply = ErrorReply.parse(bytes(self.payload))
        return reply.code, reply.message.decode("utf-8", "replace")


def _hcrc(head) -> int:
    return binascii.crc_hqx(head, 0xFFFF)


def encode(command: int, seq: int, payload: bytes = b"", flags: int = 0, *more: bytes) -> bytes:
    """Build one frame; its payload is ``payload`` followed by ``more`` (any buffers), so a
    sender can frame a header and a large array without first joining them."""
    parts = (payload, *more)
    length = sum(memoryview(p).nbytes for p in parts)
    head = HEADER.pack(SYNC, flags, command, seq & 0xFFFF, length, 0)[:HEADER_SIZE - 2]
    crc = 0
    for p in parts:
        crc = crc32(p, crc)
    return b"".join((head, _hcrc(head).to_bytes(2, "little"), *parts, crc.to_bytes(4, "little")))


def error_payload(code: ErrorCode, message: str) -> bytes:
    return ErrorReply.build(dict(code=code, message=message.encode("utf-8")))


class FrameReader:
    """Incremental frame parser: feed bytes as they arrive, collect frames and frame errors.

    ``feed`` returns a list whose items are Frame or FrameError, in arrival order.
    Garbage between frames is skipped by hunting for SYNC.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.buf = bytearray()
        self.max_payload = max_payload
        self.discarded = 0

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        if not self.buf and isinstance(data, bytes):
            if not data:
                return []
            out, pos = self._parse(data, 0)  # the usual case, whole frames: parsed in place
            self.buf += memoryview(data)[pos:]
            return out
        self.buf += data
        out, pos = self._parse(self.buf, 0)
        del self.buf[:pos]
        return out

    def _parse(self, buf: bytes | bytearray, pos: int) -> tuple[list[Frame | FrameError], int]:
        """Frames and frame errors in ``buf`` from ``pos``, and where unconsumed bytes begin."""
        out: list[Frame | FrameError] = []
        while True:
            start = buf.find(SYNC, pos)
            if start < 0:
                # a last byte that may start a SYNC is kept, unless a frame just parsed ended in it
                keep = max(pos, len(buf) - 1) if buf.endswith(SYNC[:1]) else len(buf)
                self.discarded += keep - pos
                return out, keep
            self.discarded += start - pos
            pos = start
            if len(buf) - pos < HEADER_SIZE:
                return out, pos
            _, flags, command, seq, length, hcrc = HEADER.unpack_from(buf, pos)
            if _hcrc(memoryview(buf)[pos:pos + HEADER_SIZE - 2]) != hcrc:
                out.append(FrameError(ErrorCode.BAD_HEADER, None, f"header CRC mismatch at stream byte {pos}"))
                pos += 1
                continue
            if length > self.max_payload:
                out.append(FrameError(ErrorCode.FRAME_TOO_LARGE, seq,
                                      f"payload of {length} bytes exceeds the maximum {self.max_payload}", command))
                pos += HEADER_SIZE
                continue
            end = pos + HEADER_SIZE + length + TRAILER_SIZE
            if len(buf) < end:
                return out, pos
            payload = memoryview(buf)[pos + HEADER_SIZE:end - TRAILER_SIZE]
            if isinstance(buf, bytearray):  # about to be reused: the frame keeps a copy
                payload = bytes(payload)
            crc = crc32(payload)
            if crc != int.from_bytes(buf[end - TRAILER_SIZE:end], "little"):
                out.append(FrameError(ErrorCode.BAD_CRC, seq, f"payload CRC mismatch in frame seq {seq}", command))
                # hunt on from the next byte, not past the frame: a frame that lost a byte on the way took
                # the first bytes of the next one to make up its length, and that next frame is still here
                pos += 1
                continue
            out.append(Frame(command, seq, payload, flags, crc))
            pos = end
