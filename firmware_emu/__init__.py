"""The emulated nvcim chip and its datasheet (register map, wire protocol, program format).

Importing this package registers the ``emu://`` URL scheme with pyserial.
"""

import serial

from .chip import Chip, ChipConfig, ChipError

if __name__ not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append(__name__)

__all__ = ["Chip", "ChipConfig", "ChipError"]
