"""The same chip behind every transport: in-process emu://, a real pty, TCP loopback."""

import numpy as np
import pytest
import serial

from nvcim import driver  # noqa: F401  (registers the emu:// scheme with pyserial)
from nvcim.firmware_emu.contract.protocol import Command, Frame, FrameReader, IdentifyReply, encode
from nvcim.firmware_emu.contract.registers import CHIP_ID_VALUE


def _ask(port: serial.SerialBase, command: int, seq: int, payload: bytes = b"") -> Frame:
    port.write(encode(command, seq, payload))
    reader, frames = FrameReader(), []
    while not frames:
        data = port.read(max(1, port.in_waiting))
        assert data, "no reply from the chip"
        frames = reader.feed(data)
    return frames[0]


def test_plain_pyserial_on_a_pty(serve):
    server = serve("--pty", "--arrays", "12")
    with serial.Serial(server.address, timeout=5) as port:
        reply = _ask(port, Command.IDENTIFY, 1)
        assert reply.seq == 1 and not reply.is_error
        ident = IdentifyReply.parse(reply.payload)
        assert ident.chip_id == CHIP_ID_VALUE and ident.geometry.arrays == 12
        reply = _ask(port, Command.PING, 2, bytes(range(256)) * 64)
        assert reply.payload == bytes(range(256)) * 64


def test_plain_pyserial_on_tcp(serve):
    server = serve("--tcp", "0")
    assert server.address.startswith("socket://127.0.0.1:")
    with serial.serial_for_url(server.address, timeout=5) as port:
        assert IdentifyReply.parse(_ask(port, Command.IDENTIFY, 7).payload).chip_id == CHIP_ID_VALUE


def test_unknown_command_gets_an_error_reply_not_silence():
    with serial.serial_for_url("emu://") as port:
        reply = _ask(port, 0x7E, 3)
        assert reply.is_error and "unknown command 0x7E" in reply.error()[1]


def test_driver_over_tcp_matches_in_process(serve, mlp_path, batch):
    server = serve("--tcp", "0", "--sigma", "0.3", "--seed", "9")
    with driver.load(mlp_path, device=server.address) as sess:
        over_tcp = sess.run(None, {"x": batch})[0]
    with driver.load(mlp_path, device="emu://?sigma=0.3&seed=9") as sess:
        assert np.array_equal(sess.run(None, {"x": batch})[0], over_tcp)


def test_bad_emu_option_names_the_option():
    with pytest.raises(driver.LinkError, match="unknown chip option 'sigmaa'"):
        driver.open("emu://?sigmaa=0.3")
    with pytest.raises(driver.LinkError, match="model='foo' is not valid \\(expected GAUSSIAN"):
        driver.open("emu://?model=foo")


def test_device_from_environment(monkeypatch):
    monkeypatch.setenv("NVCIM_DEVICE", "emu://?arrays=3")
    with driver.open() as dev:
        assert dev.identity.geometry.arrays == 3
