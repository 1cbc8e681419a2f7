"""Which chip a call talks to when it names none: the one rule every entry point follows.

The argument wins; else ``$NVCIM_DEVICE`` (so a whole session, a test run or the CLI can
be pointed at a board or an emulator image at once); else the caller's default: a fresh
in-process chip for the driver, an ideal one for the onnx backend, the flow's chip image
for the CLI.

A model split over several chips names them all: a list, or URLs separated by commas
(``NVCIM_DEVICE=socket://10.0.0.2:5000,socket://10.0.0.3:5000``); only ``driver.load``
takes several, every other entry point one.
"""

from __future__ import annotations

import os

ENV_VAR = "NVCIM_DEVICE"
IN_PROCESS_CHIP = "emu://"


def resolve_devices(device: str | list[str] | tuple[str, ...] | None = None,
                    default: str = IN_PROCESS_CHIP) -> list[str]:
    """The device URLs to open, in pipeline order: ``device`` (a URL, comma-separated URLs or
    a list), else $NVCIM_DEVICE, else ``default``."""
    chosen = device or os.environ.get(ENV_VAR) or default
    urls = [u.strip() for u in chosen.split(",")] if isinstance(chosen, str) else [str(u).strip() for u in chosen]
    if not urls or not all(urls):
        where = "device argument" if device else f"${ENV_VAR}"
        raise ValueError(f"{where} {chosen!r} has an empty device URL")
    return urls


def resolve_device(device: str | None = None, default: str = IN_PROCESS_CHIP) -> str:
    """The device URL to open: ``device``, else $NVCIM_DEVICE, else ``default``; one device."""
    urls = resolve_devices(device, default)
    if len(urls) > 1:
        source = "device" if device else f"${ENV_VAR}"
        raise ValueError(f"{source} names {len(urls)} devices ({', '.join(urls)}); this call talks to one "
                         f"(only driver.load splits a model over several)")
    return urls[0]
