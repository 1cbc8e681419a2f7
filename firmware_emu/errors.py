"""How the chip refuses a command: ``ChipError``, and the payload-size checks every handler uses.

Whatever a handler raises as a ChipError becomes the error reply of that frame (and, unless
``record=False``, the error registers); any other exception is an internal fault.
"""

from __future__ import annotations

from construct import Construct

from .contract.protocol import ErrorCode, PayloadError, parse_fixed, split_header


class ChipError(Exception):
    """A command the chip refuses; becomes an error reply with ``code``.

    ``record=False`` for a reply that reports an error without being one (OP_RESULT
    returning a background operation's error): it leaves the error registers alone.
    """

    def __init__(self, code: ErrorCode, message: str, record: bool = True):
        super().__init__(message)
        self.code = code
        self.record = record


def expect_empty(name: str, payload: bytes) -> None:
    if payload:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: takes no payload, got {len(payload)} bytes")


def parse_args(name: str, layout: Construct, payload: bytes):
    """Parse a command's fixed-size argument struct, or refuse a payload of the wrong size."""
    try:
        return parse_fixed(layout, payload)
    except PayloadError as e:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: {e}") from None


def parse_header(name: str, layout: Construct, payload: bytes):
    """A command's fixed-size header and the bulk data after it, or refuse a payload too short for it."""
    try:
        return split_header(layout, payload)
    except PayloadError as e:
        raise ChipError(ErrorCode.BAD_LENGTH, f"{name}: {e}") from None
