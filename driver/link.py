"""A reliable request/reply link over any pyserial port.

Each command carries a fresh sequence number. A reply that does not arrive in time, or
arrives damaged, or a chip reply saying our frame arrived damaged, makes the link send the
same frame again with the same sequence number; the chip answers a repeat from its reply
cache without executing it twice, so every command is safe to retransmit.
"""

from __future__ import annotations

import logging
import time

import serial

from nvcim.firmware_emu.contract.protocol import (
    FLAG_RESPONSE,
    MAX_PAYLOAD,
    Command,
    ErrorCode,
    Frame,
    FrameError,
    FrameReader,
    RegReadArgs,
    RegReadReply,
    encode,
)
from nvcim.firmware_emu.contract.registers import BY_NAME

from .errors import DeviceError, LinkError, LinkTimeout, ProtocolError

log = logging.getLogger(__name__)

_RETRANSMIT_CODES = {ErrorCode.BAD_CRC, ErrorCode.BAD_HEADER}
UNREADABLE_SEQ = 0xFFFF  # the chip's replies to frames whose header it could not read


class Link:
    def __init__(self, port: serial.SerialBase, timeout: float = 5.0, retries: int = 8):
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.retransmissions = 0
        self._seq = 0
        self._reader = FrameReader(MAX_PAYLOAD)
        port.timeout = min(0.05, timeout)

    def close(self) -> None:
        self.port.close()

    def transact(self, command: Command, payload: bytes = b"", *more: bytes, retries: int | None = None) -> bytes:
        """Send one command and return the chip's reply payload (``retries`` overrides the default).

        ``more``: further buffers the payload continues with (framed without joining them first).
        """
        return bytes(self.exchange(command, payload, *more, retries=retries).payload)

    def exchange(self, command: Command, payload: bytes = b"", *more: bytes, flags: int = 0,
                 retries: int | None = None) -> Frame:
        """As ``transact``, with request ``flags`` (e.g. FLAG_ASYNC), returning the whole reply frame."""
        retries = self.retries if retries is None else retries
        self._seq = self._next_seq()
        frame = encode(command, self._seq, payload, flags, *more)
        last_problem = "no reply"
        for attempt in range(retries + 1):
            if attempt:
                self.retransmissions += 1
                log.debug("retransmitting %s seq %d (%s)", command.name, self._seq, last_problem)
            try:
                self.port.write(frame)
                reply = self._await(self._seq)
            except (serial.SerialException, OSError) as e:
                raise LinkError(f"{command.name}: link to {self.port.port} lost: {e}") from None
            if isinstance(reply, str):
                last_problem = reply
                continue
            if reply.is_error:
                code, message = reply.error()
                if code in _RETRANSMIT_CODES:
                    last_problem = f"chip saw a damaged frame ({ErrorCode(code).name})"
                    continue
                raise DeviceError(command.name, code, message, self._status_after_error())
            if reply.command != command:
                raise ProtocolError(f"{command.name}: reply is for command 0x{reply.command:02X}")
            return reply
        if last_problem == "no reply":
            raise LinkTimeout(f"{command.name}: no reply from the chip after {retries + 1} tries "
                              f"of {self.timeout:g} s on {self.port.port}")
        raise ProtocolError(f"{command.name}: gave up after {retries + 1} tries: {last_problem}")

    def _next_seq(self) -> int:
        """1..0xFFFE: 0xFFFF marks the chip's replies to frames whose header was unreadable."""
        return self._seq % 0xFFFE + 1

    def _await(self, seq: int) -> Frame | str:
        """The reply to ``seq``, or a string saying why none usable arrived."""
        deadline = time.monotonic() + self.timeout
        items = self._reader.feed(b"")
        while True:
            for item in items:
                if isinstance(item, FrameError):
                    if item.seq in (seq, None):
                        return f"damaged reply ({item.code.name})"
                elif item.flags & FLAG_RESPONSE and item.seq == seq:
                    return item
                elif item.seq == UNREADABLE_SEQ and item.is_error and item.error()[0] == ErrorCode.BAD_HEADER:
                    return "chip saw a damaged header"  # perhaps ours: resend now rather than time out
            data = self.port.read(max(1, self.port.in_waiting))
            items = self._reader.feed(data)
            if data:
                continue
            if self._nothing_more_can_come() or time.monotonic() >= deadline:
                self._reader.buf.clear()
                return "no reply"

    def _nothing_more_can_come(self) -> bool:
        # A port that answers inside write() (an in-process chip): an empty read means the reply is lost.
        return getattr(self.port, "replies_inline", False)

    def _status_after_error(self) -> int | None:
        """STATUS register, read after a refused command so the error can carry it."""
        self._seq = self._next_seq()
        self.port.write(encode(Command.REG_READ, self._seq, RegReadArgs.build(dict(addr=BY_NAME["STATUS"].offset))))
        reply = self._await(self._seq)
        if isinstance(reply, Frame) and not reply.is_error and len(reply.payload) == RegReadReply.sizeof():
            return RegReadReply.parse(bytes(reply.payload)).value
        return None
