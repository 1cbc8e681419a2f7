"""Link traces: every frame between host and chip, timestamped and decoded, and their replay.

``TracingSerial`` is a pyserial port that passes every byte to another port and cuts
both directions into frames, as pyserial's ``spy://`` does for raw bytes. Each frame
becomes a ``TraceRecord``: time since the trace began, direction, command, sequence
number, flags, length, error code and a short decoded summary of the payload. Reach it
three ways:

    driver.open("trace://emu://?seed=1")                     # live lines on stderr
    driver.open("trace:///dev/pts/3#file=bringup.jsonl")     # JSON lines to a file
    TracingSerial.around(port, "bringup.jsonl")              # wrap a port already open

The part after ``trace://`` is any device URL or port name; options follow ``#``
(``file=PATH``: JSON lines; ``echo=1``: live lines on stderr as well). A JSON-lines
trace keeps every request's payload, so ``replay`` can send the same requests to
another chip and report the first reply that differs.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO

import serial
from serial import SerialBase, SerialException

from nvcim.firmware_emu.contract.protocol import (
    FLAG_ASYNC,
    FLAG_ERROR,
    FLAG_RESPONSE,
    MAX_PAYLOAD,
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
    Frame,
    FrameError,
    FrameReader,
    IdentifyReply,
    ProgramFetchReply,
    ProgramLoadArgs,
    RegReadArgs,
    RegReadReply,
    RegWriteArgs,
    RunArgs,
    encode,
    parse_fixed,
    parse_output_shapes,
    split_header,
)
from nvcim.firmware_emu.contract.registers import BY_OFFSET, lookup

TRACE_FORMAT = 1
KEEP_REPLY_PAYLOAD = 256  # reply payloads up to this size are kept in a JSON trace (larger: length and CRC)
SUMMARY_CHARS = 100

# What a trace goes to: a JSON-lines file (path), a text stream (live lines), or a function of each record.
TraceSink = str | os.PathLike | IO[str] | Callable[["TraceRecord"], None]


@dataclass
class TraceRecord:
    """One frame on the link. ``direction``: "tx" host to chip, "rx" chip to host."""

    t: float
    direction: str
    command: int
    seq: int | None
    flags: int
    length: int
    crc: int | None
    summary: str
    error: int | None = None        # an error reply's ErrorCode
    payload: bytes | None = None    # kept for requests (replay) and small replies
    damaged: str | None = None      # the frame arrived broken: why

    @property
    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"0x{self.command:02X}"

    @property
    def is_request(self) -> bool:
        return self.direction == "tx" and not self.flags & FLAG_RESPONSE and self.damaged is None

    def line(self) -> str:
        """One terminal line: time, direction, command, seq, flags, length, summary."""
        arrow = "->" if self.direction == "tx" else "<-"
        seq = "?" if self.seq is None else str(self.seq)
        what = f"DAMAGED {self.damaged}" if self.damaged else self.summary
        return (f"{self.t:11.6f} {arrow} {self.command_name:<13} #{seq:<5} {flag_names(self.flags):<10} "
                f"{self.length:>8} B  {what}").rstrip()

    def to_json(self) -> dict:
        d = dict(t=round(self.t, 9), dir=self.direction, cmd=self.command_name, code=self.command, seq=self.seq,
                 flags=self.flags, len=self.length, crc=self.crc, summary=self.summary)
        if self.error is not None:
            d["error"] = _error_name(self.error)
        if self.payload is not None:
            d["payload"] = base64.b64encode(self.payload).decode("ascii")
        if self.damaged is not None:
            d["damaged"] = self.damaged
        return d

    @classmethod
    def from_json(cls, d: dict) -> TraceRecord:
        error = ErrorCode.__members__.get(d.get("error", ""))
        return cls(d["t"], d["dir"], d["code"], d["seq"], d["flags"], d["len"], d["crc"], d["summary"],
                   None if error is None else int(error),
                   base64.b64decode(d["payload"]) if "payload" in d else None, d.get("damaged"))


def flag_names(flags: int) -> str:
    names = [n for bit, n in ((FLAG_RESPONSE, "RESP"), (FLAG_ERROR, "ERR"), (FLAG_ASYNC, "ASYNC")) if flags & bit]
    return "|".join(names) or "-"


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


# -- decoding ------------------------------------------------------------------------------------
def _region(r) -> str:
    return f"array {r.array} rows {r.row}..{r.row + r.height - 1} cols {r.col}..{r.col + r.width - 1}"


def _leaves(parsed) -> Iterator[tuple[str, object]]:
    """(name, value) of every field of a parsed payload, nested ones (a geometry) flattened."""
    if dataclasses.is_dataclass(parsed):
        items = ((f.name, getattr(parsed, f.name)) for f in dataclasses.fields(parsed))
    else:
        items = ((k, v) for k, v in parsed.items() if not k.startswith("_"))
    for name, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield name, value


def _fields(parsed) -> str:
    """``k=v`` for every field of a parsed payload, so a field added to the contract shows by itself."""
    return " ".join(f"{k}=0x{v:X}" if isinstance(v, int) and (k.endswith("id") or k in ("version", "crc"))
                    else f"{k}={v}" for k, v in _leaves(parsed))


def _register(addr: int) -> str:
    reg = BY_OFFSET.get(addr)
    return f"0x{addr:03X} (unmapped)" if reg is None else reg.name


def _request_summary(command: int, p: bytes) -> str:
    if command == Command.REG_READ:
        return _register(parse_fixed(RegReadArgs, p).addr)
    if command == Command.REG_WRITE:
        a = parse_fixed(RegWriteArgs, p)
        return f"{_register(a.addr)} <- 0x{a.value:08X}"
    if command == Command.BUF_WRITE:
        head, data = split_header(BufWriteHeader, p)
        return f"offset {head.offset}, {len(data)} bytes"
    if command == Command.BUF_READ:
        a = parse_fixed(BufReadArgs, p)
        return f"offset {a.offset}, {a.length} bytes"
    if command == Command.PROGRAM_LOAD:
        return _fields(parse_fixed(ProgramLoadArgs, p))
    if command == Command.CELLS_WRITE:
        a = parse_fixed(CellsWriteArgs, p)
        return f"{_region(a.region)} {_enum_name(CellMode, a.mode)}{' masked' if a.masked else ''}"
    if command == Command.CELLS_READ:
        a = parse_fixed(CellsReadArgs, p)
        return f"{_region(a.region)} {_enum_name(CellQuantity, a.quantity)}"
    if command == Command.CELLS_ERASE:
        a = parse_fixed(CellsEraseArgs, p)
        return f"{_region(a.region)} x{a.arrays} arrays"
    if command in (Command.RUN, Command.INFER):
        head, inputs = split_header(RunArgs, p)
        return f"batch {head.batch}" + (f", {len(inputs)} input bytes" if command == Command.INFER else "")
    return _hex(p)


def _reply_summary(command: int, p: bytes, request: bytes | None) -> str:
    if command == Command.REG_READ:
        value = parse_fixed(RegReadReply, p).value
        name = _register(struct.unpack_from("<I", request)[0]) if request and len(request) >= 4 else "value"
        return f"{name} = 0x{value:08X}"
    if command == Command.IDENTIFY:
        return _fields(IdentifyReply.parse(p))
    if command == Command.CELLS_WRITE:
        return _fields(CellsWriteReply.parse(p))
    if command == Command.PROGRAM_FETCH:
        return _fields(parse_fixed(ProgramFetchReply, p))
    if command == Command.CELLS_READ:
        return f"{parse_fixed(CellsReadReply, p).length} bytes in the buffer"
    if command in (Command.RUN, Command.INFER) and p:
        shapes, end = parse_output_shapes(p)
        return "outputs " + " ".join("x".join(map(str, s)) for s in shapes) + (
            f", {len(p) - end} output bytes" if command == Command.INFER else "")
    return _hex(p)


def _enum_name(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)


def _hex(p: bytes) -> str:
    if not p:
        return ""
    head = bytes(p[:16]).hex(" ")
    return head + (f" ... ({len(p)} bytes)" if len(p) > 16 else "")


def summarize(frame: Frame, request: bytes | None = None) -> tuple[str, int | None]:
    """A short decoded description of a frame, and its error code if it is an error reply.
    ``request``: for a reply, the payload of the request it answers (names a REG_READ's register)."""
    p = bytes(frame.payload)
    if frame.is_error:
        code, message = frame.error()
        if len(message) > SUMMARY_CHARS:
            message = message[:SUMMARY_CHARS - 3] + "..."
        return f"ERROR {_error_name(code)}: {message}", code
    try:
        if frame.flags & FLAG_RESPONSE:
            if frame.flags & FLAG_ASYNC:
                return "started in the background", None
            return _reply_summary(frame.command, p, request), None
        return _request_summary(frame.command, p), None
    except Exception as e:  # noqa: BLE001 - a payload the command does not expect: show it, never break the link
        return f"{_hex(p)} (undecodable: {type(e).__name__})", None


# -- recording -----------------------------------------------------------------------------------
class Tracer:
    """Cuts both directions of a link into frames and hands each record to ``emit``."""

    def __init__(self, emit: Callable[[TraceRecord], None]):
        self.emit = emit
        self.start = time.monotonic()
        self._readers = {"tx": FrameReader(MAX_PAYLOAD), "rx": FrameReader(MAX_PAYLOAD)}
        self._requests: dict[int, bytes] = {}  # seq -> the payload of the last request with it
        self._lock = threading.Lock()

    def feed(self, direction: str, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            now = time.monotonic() - self.start
            for item in self._readers[direction].feed(bytes(data)):
                self.emit(self._record(direction, now, item))

    def _record(self, direction: str, now: float, item: Frame | FrameError) -> TraceRecord:
        if isinstance(item, FrameError):
            return TraceRecord(now, direction, item.command, item.seq, 0, 0, None, "", damaged=str(item))
        payload = bytes(item.payload)
        is_reply = bool(item.flags & FLAG_RESPONSE)
        if not is_reply:
            self._requests[item.seq] = payload[:64]
        summary, error = summarize(item, self._requests.get(item.seq) if is_reply else None)
        keep = payload if not is_reply or len(payload) <= KEEP_REPLY_PAYLOAD else None
        return TraceRecord(now, direction, item.command, item.seq, item.flags, len(payload), item.crc, summary,
                           error, keep)


class JsonLinesSink:
    """Records as JSON lines, after a header line naming the format, the start time and the port."""

    def __init__(self, path: str | os.PathLike, port: str):
        self.path = Path(path)
        self._file = self.path.open("w", encoding="utf-8")
        header = dict(nvcim_trace=TRACE_FORMAT, port=port,
                      started=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"))
        self._file.write(json.dumps(header) + "\n")

    def __call__(self, record: TraceRecord) -> None:
        self._file.write(json.dumps(record.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TextSink:
    """Records as terminal lines, flushed one by one (a live view)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __call__(self, record: TraceRecord) -> None:
        self.stream.write(record.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The stream belongs to whoever passed it."""


def _sinks_for(trace: TraceSink, port: str) -> list:
    if callable(trace) and not hasattr(trace, "write"):
        return [trace]
    if hasattr(trace, "write"):
        return [TextSink(trace)]
    if str(trace) == "-":
        return [TextSink(sys.stderr)]
    return [JsonLinesSink(trace, port)]


class TracingSerial(SerialBase):
    """A pyserial port that forwards to another port and records every frame in both directions.

    Opened by URL (``trace://INNER#file=PATH&echo=1``, through ``serial_for_url``) or built
    around an open port with ``around``. Closing it closes the inner port and the trace file.
    """

    inner: SerialBase | None = None

    @classmethod
    def around(cls, inner: SerialBase, trace: TraceSink) -> TracingSerial:
        """Trace a port that is already open: to a JSON-lines file (path), a text stream, or a function."""
        port = cls(None, timeout=inner.timeout)
        port._attach(inner, _sinks_for(trace, inner.port or "?"), f"trace:{inner.port}")
        return port

    def open(self) -> None:
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        if self.is_open:
            raise SerialException("Port is already open.")
        inner_url, options = parse_trace_url(self._port)
        inner = serial.serial_for_url(inner_url, timeout=self._timeout)
        try:
            sinks = [JsonLinesSink(options["file"], inner_url)] if "file" in options else []
        except OSError as e:
            inner.close()
            raise SerialException(f"{self._port}: cannot write the trace file: {e}") from None
        if not sinks or options.get("echo", "0") not in ("0", ""):
            sinks.append(TextSink(sys.stderr))
        self._attach(inner, sinks, None)

    def _attach(self, inner: SerialBase, sinks: list, name: str | None) -> None:
        self.inner, self._sinks = inner, sinks
        self.tracer = Tracer(self._emit)
        if name is not None:
            self._port = name
        self.is_open = True

    def _emit(self, record: TraceRecord) -> None:
        for sink in self._sinks:
            sink(record)

    @property
    def replies_inline(self) -> bool:
        """As the inner port: an in-process chip answers inside write()."""
        return getattr(self.inner, "replies_inline", False)

    def _reconfigure_port(self) -> None:
        if self.inner is not None:
            self.inner.timeout = self._timeout

    @property
    def in_waiting(self) -> int:
        self._require_open()
        return self.inner.in_waiting

    def write(self, data) -> int:
        self._require_open()
        self.tracer.feed("tx", data)
        return self.inner.write(data)

    def read(self, size: int = 1) -> bytes:
        self._require_open()
        data = self.inner.read(size)
        self.tracer.feed("rx", data)
        return data

    def reset_input_buffer(self) -> None:
        self._require_open()
        self.inner.reset_input_buffer()

    def reset_output_buffer(self) -> None:
        self._require_open()
        self.inner.reset_output_buffer()

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self.inner.close()
            for sink in self._sinks:
                if hasattr(sink, "close"):
                    sink.close()

    def _require_open(self) -> None:
        if not self.is_open:
            raise serial.PortNotOpenError()


def parse_trace_url(url: str) -> tuple[str, dict[str, str]]:
    """``trace://INNER#opt=v&...`` -> (INNER, options); unknown options are refused by name."""
    if not url.lower().startswith("trace://"):
        raise SerialException(f"expected trace://DEVICE[#file=PATH&echo=1], got {url!r}")
    inner, _, fragment = url[len("trace://"):].partition("#")
    if not inner:
        raise SerialException(f"{url}: name the device to trace after trace://, e.g. trace://emu://?seed=1")
    options = {k: v[-1] for k, v in urllib.parse.parse_qs(fragment, keep_blank_values=True).items()}
    unknown = set(options) - {"file", "echo"}
    if unknown:
        raise SerialException(f"{url}: unknown trace option(s) {', '.join(sorted(unknown))} (known: file, echo)")
    return inner, options


def traced_url(url: str, trace: str | os.PathLike | None) -> str:
    """``url`` traced to a JSON-lines file (``trace`` a path) or live to stderr (``"-"``); unchanged for None."""
    if trace is None:
        return url
    return f"trace://{url}" if str(trace) == "-" else f"trace://{url}#file={os.fspath(trace)}"


# -- reading and replaying -----------------------------------------------------------------------
class TraceFileError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


def read_trace(path: str | os.PathLike) -> Iterator[tuple[int, TraceRecord]]:
    """(line number, record) for every frame of a JSON-lines trace."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise TraceFileError(f"{path}: {e.strerror}") from None
    if not lines or '"nvcim_trace"' not in lines[0]:
        raise TraceFileError(f"{path}:1: not an nvcim trace (JSON lines with a header; record one with "
                             f"--trace FILE or trace://DEVICE#file=FILE)")
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        try:
            yield number, TraceRecord.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as e:
            raise TraceFileError(f"{path}:{number}: not a trace record: {e}") from None


@dataclass(frozen=True)
class Difference:
    """The first replayed request whose reply is not the recorded one."""

    line: int          # the request's line in the trace file
    index: int         # 1-based among the replayed requests
    request: str       # its command and summary
    recorded: str
    replayed: str

    def __str__(self) -> str:
        return (f"request {self.index} (line {self.line}): {self.request}\n"
                f"  recorded: {self.recorded}\n  replayed: {self.replayed}")


@dataclass(frozen=True)
class ReplayResult:
    requests: int                     # requests sent
    difference: Difference | None     # None: every reply matched


def _requests_and_replies(records: Iterable[tuple[int, TraceRecord]]
                          ) -> list[tuple[int, TraceRecord, TraceRecord | None]]:
    """Each distinct request (a retransmission of the previous one is not repeated) with the
    last reply recorded for it."""
    out: list[list] = []
    for number, rec in records:
        if rec.is_request:
            prev = out[-1][1] if out else None
            if prev is not None and (prev.seq, prev.command, prev.crc) == (rec.seq, rec.command, rec.crc):
                continue
            if rec.payload is None:
                raise TraceFileError(f"line {number}: the request's payload was not recorded; cannot replay")
            out.append([number, rec, None])
        elif rec.direction == "rx" and rec.damaged is None and rec.flags & FLAG_RESPONSE and out:
            for entry in reversed(out[-4:]):  # replies follow their request closely
                if entry[1].seq == rec.seq:
                    entry[2] = rec
                    break
    return [tuple(e) for e in out]


def _await_reply(port: SerialBase, reader: FrameReader, seq: int, timeout: float) -> Frame | None:
    deadline = time.monotonic() + timeout
    while True:
        for item in reader.feed(port.read(max(1, port.in_waiting))):
            if isinstance(item, Frame) and item.flags & FLAG_RESPONSE and item.seq == seq:
                return item
        nothing_more = getattr(port, "replies_inline", False) and not port.in_waiting  # an in-process chip
        if nothing_more or time.monotonic() >= deadline:
            return None


def replay(path: str | os.PathLike, port: SerialBase, timeout: float = 5.0,
           ignore: Iterable[str] = ()) -> ReplayResult:
    """Send a trace's requests to ``port`` with their recorded sequence numbers and flags, and
    stop at the first reply that differs from the recorded one (flags, error, length or CRC).

    ``ignore``: registers whose REG_READ values may differ (e.g. OP_PROGRESS of a background
    operation, which depends on timing); their replies are not compared.
    """
    skip = {lookup(name.upper()).offset for name in ignore}
    pairs = _requests_and_replies(read_trace(path))
    port.timeout = min(0.05, timeout)
    reader = FrameReader(MAX_PAYLOAD)
    for index, (number, req, recorded) in enumerate(pairs, start=1):
        port.write(encode(req.command, req.seq, req.payload, req.flags))
        reply = _await_reply(port, reader, req.seq, timeout)
        if recorded is None:
            continue
        if reply is None:
            return ReplayResult(index, Difference(number, index, f"{req.command_name} {req.summary}",
                                                  recorded.summary, f"no reply within {timeout:g} s"))
        if req.command == Command.REG_READ and struct.unpack_from("<I", req.payload)[0] in skip:
            continue
        same = (reply.flags, len(reply.payload), reply.crc) == (recorded.flags, recorded.length, recorded.crc)
        if not same:
            return ReplayResult(index, Difference(number, index, f"{req.command_name} {req.summary}",
                                                  f"[{flag_names(recorded.flags)}] {recorded.summary}",
                                                  f"[{flag_names(reply.flags)}] {summarize(reply, req.payload)[0]}"))
    return ReplayResult(len(pairs), None)
