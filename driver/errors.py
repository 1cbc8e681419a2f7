"""Exceptions a host application can act on.

    NvcimError
    ├── DeviceError      the chip refused a command (carries its error code and STATUS)
    ├── LinkError        the link failed
    │   ├── ProtocolError   replies that make no sense (bad frames past all retries)
    │   └── LinkTimeout     no reply in time, after all retries (also a TimeoutError)
    │       └── OperationTimeout  a background operation still runs when wait() gives up
    └── InvalidArgument  the host call itself is wrong (names, shapes, dtypes; also a ValueError)

compiler.CompileError (a ValueError) is re-exported here for convenience.
"""

from __future__ import annotations

from nvcim.compiler import CompileError
from nvcim.firmware_emu.contract.protocol import ErrorCode

__all__ = ["NvcimError", "DeviceError", "LinkError", "ProtocolError", "LinkTimeout", "OperationTimeout",
           "InvalidArgument", "CompileError"]


class NvcimError(Exception):
    """Base of every error the driver raises (besides CompileError)."""


class DeviceError(NvcimError):
    def __init__(self, command: str, code: int, message: str, status: int | None = None):
        try:
            code_name = ErrorCode(code).name
        except ValueError:
            code_name = f"code {code}"
        text = f"{command} failed on the chip: {code_name}: {message}"
        if status is not None:
            text += f" (STATUS=0x{status:02X})"
        super().__init__(text)
        self.command, self.code, self.chip_message, self.status = command, code, message, status


class LinkError(NvcimError):
    pass


class ProtocolError(LinkError):
    pass


class LinkTimeout(LinkError, TimeoutError):
    pass


class OperationTimeout(LinkTimeout):
    """``Operation.wait`` gave up: the chip answers, but the operation is still running.

    A LinkTimeout so code that handles "the chip took too long" catches both; the
    operation goes on, so the caller can wait again or abort it.
    """


class InvalidArgument(NvcimError, ValueError):
    pass
