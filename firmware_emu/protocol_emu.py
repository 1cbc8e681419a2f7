"""pyserial URL handler ``emu://`` for a chip living in this process.

``serial.serial_for_url("emu://?seed=1&sigma=0.3")`` returns a complete pyserial
``Serial`` whose writes go straight into the chip and whose reads return its replies.
Buffers are handed over whole (``loop://`` queues byte by byte and moves ~0.4 MB/s).

``emu://NAME?...`` names a chip that stays powered in this process: a later open of
the same name reaches the same cells, as a board left on the bench would.
``emu://?image=PATH`` powers the chip up from a non-volatile image directory (created
if absent), so separate processes reach the same cells and program.
``link_faults=RATE&link_seed=N`` corrupts the bytes on this link (see link_faults).
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from serial import PortNotOpenError, SerialBase, SerialException

from .chip import Chip, ChipConfig
from .link_faults import LinkFaults
from .nvm_image import ImageError

_BENCH: dict[str, Chip] = {}


def link_options(url: str) -> dict[str, str]:
    """The query of an emu:// URL as a dict, last value winning."""
    query = urllib.parse.urlsplit(url).query
    return {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}


def chip_for_url(url: str) -> Chip:
    """Create (or, for a named chip, find) the chip an ``emu://`` URL describes."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "emu":
        raise SerialException(f"not an emu:// URL: {url!r}")
    options = link_options(url)
    image = options.pop("image", None)
    options.pop("link_faults", None)
    options.pop("link_seed", None)
    name = parts.netloc + parts.path
    try:
        settings = ChipConfig.parse_options(options)
        if name in _BENCH:
            chip = _BENCH[name]
            if dataclasses.replace(chip.config, **settings) != chip.config:
                raise ValueError(f"chip '{name}' is already on the bench with other settings ({chip.config}); "
                                 f"open it without options or with the same ones")
            return chip
        chip = Chip.with_image(image, settings) if image else Chip(ChipConfig(**settings))
    except (ValueError, ImageError) as e:
        raise SerialException(f"{url}: {e}") from None
    if name:
        _BENCH[name] = chip
    return chip


class Serial(SerialBase):
    """A serial port whose far end is an in-process emulated chip."""

    chip: Chip                    # the chip this port reaches
    faults_to_chip: LinkFaults    # the fault injectors of each direction (rate 0: a clean link)
    faults_from_chip: LinkFaults
    replies_inline = True  # the reply is complete when write() returns: the link need not wait for more

    def open(self) -> None:
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        if self.is_open:
            raise SerialException("Port is already open.")
        self.chip = chip_for_url(self._port)
        options = link_options(self._port)
        try:
            rate, seed = float(options.get("link_faults", 0)), int(options.get("link_seed", 0))
            self.faults_to_chip, self.faults_from_chip = LinkFaults(rate, seed), LinkFaults(rate, seed + 1)
        except ValueError as e:
            raise SerialException(f"{self._port}: link_faults/link_seed: {e}") from None
        self._rx = bytearray()
        self.is_open = True

    def _reconfigure_port(self) -> None:
        """Baud rate and framing do not apply to an in-process link."""

    def close(self) -> None:
        self.is_open = False

    @property
    def in_waiting(self) -> int:
        self._require_open()
        return len(self._rx)

    def read(self, size: int = 1) -> bytes:
        """Return up to ``size`` reply bytes; nothing can arrive later, so never wait."""
        self._require_open()
        data = bytes(memoryview(self._rx)[:size])
        del self._rx[:size]
        return data

    def write(self, data) -> int:
        self._require_open()
        data = bytes(data)
        self._rx += self.faults_from_chip(self.chip.feed(self.faults_to_chip(data)))
        return len(data)

    def reset_input_buffer(self) -> None:
        self._require_open()
        self._rx.clear()

    def reset_output_buffer(self) -> None:
        self._require_open()

    def _require_open(self) -> None:
        if not self.is_open:
            raise PortNotOpenError()
