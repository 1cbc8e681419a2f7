"""Host driver for nvcim chips.

    sess = driver.load("model.onnx")                 # like onnxruntime.InferenceSession
    y, = sess.run(None, {"x": x})
    dev = driver.open("emu://?seed=1&sigma=0.3")     # low-level: registers, cells, noise
"""

from nvcim.firmware_emu.contract.geometry import Geometry
from nvcim.firmware_emu.contract.protocol import CellMode, CellQuantity, Identity, WriteStats

from .device import Device
from .errors import CompileError, DeviceError, InvalidArgument, LinkError, LinkTimeout, NvcimError, ProtocolError
from .session import NodeArg, Session, deploy, load


def open(url: str | None = None, timeout: float = 5.0) -> Device:  # noqa: A001 (mirrors serial/io naming)
    """Open the chip at ``url`` (default $NVCIM_DEVICE, else a fresh in-process chip)."""
    return Device.open(url, timeout=timeout)


__all__ = ["load", "open", "Session", "Device", "Identity", "Geometry", "WriteStats", "NodeArg", "deploy",
           "CellQuantity", "CellMode",
           "NvcimError", "DeviceError", "LinkError", "LinkTimeout", "ProtocolError",
           "InvalidArgument", "CompileError"]
