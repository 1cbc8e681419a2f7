"""Frames in, replies out: the chip's side of the wire protocol.

A transport hands raw bytes to ``FrameServer.feed`` and sends back what it returns.
Every frame gets exactly one reply: a damaged frame a frame-error reply, a refused
command an error reply, a fault inside the chip an INTERNAL one. The last reply is
cached with the key of its request (SEQ, COMMAND, payload CRC), so a retransmitted
frame is answered again without running twice. A transport whose hosts take turns (TCP
connections) calls ``reset`` when another host takes over: the parser and the cache are
per host.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from .contract.protocol import (
    FLAG_ASYNC,
    FLAG_ERROR,
    FLAG_RESPONSE,
    MAX_PAYLOAD,
    ErrorCode,
    Frame,
    FrameError,
    FrameReader,
    encode,
    error_payload,
)
from .errors import ChipError
from .operations import as_chip_error


class FrameServer:
    """Parses the byte stream, serves each intact frame once, and keeps the reply cache.

    ``serve(frame)`` runs a request and returns (reply payload, whether it started a
    background operation); ``refused(error)`` is told of every command error;
    ``turn()`` is held while frames are handled (the chip lock, shared with the chunks
    of a background operation).
    """

    def __init__(self, serve: Callable[[Frame], tuple[bytes, bool]], refused: Callable[[ChipError], None],
                 turn: Callable[[], AbstractContextManager]):
        self.serve, self.refused, self.turn = serve, refused, turn
        self._reader = FrameReader(MAX_PAYLOAD)
        self._last: tuple[tuple[int, int, int], bytes] | None = None  # ((seq, command, payload crc), reply)

    def reset(self) -> None:
        """A new host: forget the half frame and the reply cache its predecessor left, which
        would swallow the new host's first bytes or answer its first SEQ with an old reply."""
        with self.turn():
            self._reader = FrameReader(MAX_PAYLOAD)
            self._last = None

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived and the rest not yet."""
        return bool(self._reader.buf)

    def feed(self, data: bytes) -> bytes:
        """Consume bytes from the host; return the reply bytes (possibly empty)."""
        with self.turn():
            replies = []
            for item in self._reader.feed(data):
                if isinstance(item, FrameError):
                    seq = 0xFFFF if item.seq is None else item.seq
                    replies.append(encode(item.command, seq, error_payload(item.code, str(item)),
                                          FLAG_RESPONSE | FLAG_ERROR))
                else:
                    replies.append(self._reply(item))
            return b"".join(replies)

    def _reply(self, frame: Frame) -> bytes:
        key = (frame.seq, frame.command, frame.crc)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            if frame.flags & FLAG_RESPONSE:
                raise ChipError(ErrorCode.BAD_ARGUMENT, "frame has the RESPONSE flag set: the chip takes requests only")
            payload, started = self.serve(frame)
            # the reply to a request that started a background operation carries FLAG_ASYNC
            reply = encode(frame.command, frame.seq, payload, FLAG_RESPONSE | (FLAG_ASYNC if started else 0))
        except Exception as e:  # every frame gets a reply; a fault inside the chip is INTERNAL
            error = as_chip_error(e)
            self.refused(error)
            reply = encode(frame.command, frame.seq, error_payload(error.code, str(error)), FLAG_RESPONSE | FLAG_ERROR)
        self._last = (key, reply)
        return reply
