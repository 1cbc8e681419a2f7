"""Which chip a call talks to when it names none: the one rule every entry point follows.

The argument wins; else ``$NVCIM_DEVICE`` (so a whole session, a test run or the CLI can
be pointed at a board or an emulator image at once); else the caller's default: a fresh
in-process chip for the driver, an ideal one for the onnx backend, the flow's chip image
for the CLI.
"""

from __future__ import annotations

import os

ENV_VAR = "NVCIM_DEVICE"
IN_PROCESS_CHIP = "emu://"


def resolve_device(device: str | None = None, default: str = IN_PROCESS_CHIP) -> str:
    """The device URL to open: ``device``, else $NVCIM_DEVICE, else ``default``."""
    return device or os.environ.get(ENV_VAR) or default
