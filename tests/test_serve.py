"""A chip served on TCP survives its clients: each connection has its own frame state, one
host holds the chip at a time and the others get BUSY, an idle holder gives way, a token
keeps out hosts without it; the emulator's options are bounded and its CLI errors are one line."""

from __future__ import annotations

import collections
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import serial
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from nvcim import driver
from nvcim.driver.link import Link
from nvcim.firmware_emu.__main__ import cli
from nvcim.firmware_emu.contract.protocol import BufReadArgs, BufWriteHeader, Command, ErrorCode, FrameReader, encode

from fuzzing import fuzz
from polling import poll_until

IDLE = 3.0  # the served chip's idle timeout, seconds


class Server:
    """``python -m nvcim.firmware_emu serve --tcp 0 ...``, its URL and its log (stderr, in a file)."""

    def __init__(self, log: Path, *args: str):
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-m", "nvcim.firmware_emu", "serve", "--tcp", "0", *args],
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"emulator did not start: {line!r}; log: {self.log()}")
        self.url = line.removeprefix("serving on ")
        parts = urllib.parse.urlsplit(self.url)
        self.address = (parts.hostname, parts.port)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str) -> None:
        poll_until(lambda: text in self.log(), f"server log says {text!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "serve.log", "--arrays", "4", "--idle-timeout", str(IDLE))
    yield s
    s.stop()


def _reset_on_close(sock: socket.socket) -> None:
    """Make close() send a TCP reset, as a killed client's kernel may."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _identify_once(url: str) -> None:
    """One IDENTIFY with a one-second timeout and no retransmission: whatever the chip says comes within it."""
    link = Link(serial.serial_for_url(url), timeout=1.0, retries=0)
    try:
        link.transact(Command.IDENTIFY)
    finally:
        link.close()


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_leaves_with_replies_pending_does_not_stop_the_server(server, reset):
    with socket.create_connection(server.address) as sock:
        # 64 pings of 4 KiB: the replies stay unread (and fit the socket buffers, so sending never blocks)
        sock.sendall(b"".join(encode(Command.PING, seq, bytes(4096)) for seq in range(1, 65)))
        if reset:
            _reset_on_close(sock)
    poll_until(lambda: server.log().count("disconnected") + server.log().count(" lost: ") >= 1 + reset,
               "the server saw the client go")
    assert server.alive()
    with driver.open(server.url, timeout=2) as dev:
        assert dev.read_register("CAP_ARRAYS") == 4


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_gone_halfway_through_a_frame_leaves_no_trace(server, reset):
    with driver.open(server.url) as dev:
        dev.buffer_write(b"\x11" * 1024)
    frame = encode(Command.BUF_WRITE, 1, BufWriteHeader.build(dict(offset=0)) + b"\x5a" * (256 << 10))
    with socket.create_connection(server.address) as sock:
        sock.sendall(frame[:len(frame) // 2])
        if reset:
            _reset_on_close(sock)
    with driver.open(server.url, timeout=2) as dev:  # the next client is served at once ...
        assert dev.buffer_read(1024) == b"\x11" * 1024  # ... by a chip the half frame never reached
    assert server.alive()


def test_a_second_host_gets_busy_naming_the_holder_and_an_idle_holder_gives_way(server):
    with socket.create_connection(server.address) as silent:  # connected, and sends nothing
        holder = f"127.0.0.1:{silent.getsockname()[1]}"
        server.wait_log(f"{holder} holds the chip")
        with pytest.raises(driver.DeviceError, match=f"BUSY: the chip is held by {holder} .*idle holder gives way "
                                                     f"after {IDLE:g} s"):
            _identify_once(server.url)
        # idle for longer than the timeout, the holder gives way to the next host that asks
        poll_until(lambda: _opens(server.url), "the idle holder gave way")
        server.wait_log(f"{holder} idle for")


def _opens(url: str) -> bool:
    try:
        with driver.open(url, timeout=1):
            return True
    except driver.DeviceError as e:
        assert "BUSY" in str(e)
        return False


def test_the_holder_keeps_the_chip_while_it_works_and_hands_it_on_when_it_leaves(server):
    with driver.open(server.url) as first:
        with pytest.raises(driver.DeviceError, match="BUSY: the chip is held by"):
            _identify_once(server.url)
        first.write_register("SIGMA", 1234)
    with driver.open(server.url, timeout=2) as second:  # the first one hung up: free at once
        assert second.read_register("CAP_ARRAYS") == 4


def test_a_token_keeps_out_hosts_without_it(tmp_path):
    s = Server(tmp_path / "serve.log", "--arrays", "4", "--host", "0.0.0.0", "--token", "s3cret-bench")
    try:
        assert "warning: listening on 0.0.0.0: other machines can reach this chip" in s.log()
        url = s.url.replace("0.0.0.0", "127.0.0.1")
        with socket.create_connection(s.address):  # a host that never sends the token holds nothing
            with pytest.raises(driver.DeviceError, match=r"access denied \(no token line\)"):
                driver.open(url, timeout=2)
            with pytest.raises(driver.DeviceError, match=r"access denied \(wrong token\)"):
                driver.open(f"{url}?token=guess", timeout=2)
            with driver.open(f"{url}?token=s3cret-bench", timeout=2) as dev:
                assert dev.read_register("CAP_ARRAYS") == 4
        assert s.alive()
    finally:
        s.stop()


def test_serve_options_are_bounded():
    result = CliRunner().invoke(cli, ["serve", "--tcp", "70000"])
    assert result.exit_code == 2 and "70000 is not in the range 0<=x<=65535" in result.output


@pytest.mark.parametrize("url, message", [
    ("emu://?buffer_size=1000000000", "buffer_size=1000000000 must be in 1024..268435456"),
    ("emu://?weight_bits=256", "weight_bits=256 must be in 1..16"),
    ("emu://?arrays=65535", "65535 x 256 x 256 cells is more than the emulator's 1073741824"),
    ("emu://?seed=-1", "seed=-1 must be in 0..4294967295"),
    ("emu://?sigma=nan", "sigma=nan must be in"),
])
def test_chip_options_are_bounded(url, message):
    with pytest.raises(driver.LinkError, match=message.replace(".", r"\.")):
        driver.open(url)


def _cli_error(args: list[str], debug: bool = False):
    return CliRunner().invoke(cli, (["--debug"] if debug else []) + ["serve", *args])


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {("--arrays", "70000"): "arrays=70000 must be in 1..65535",
                 ("--image", str(tmp_path)): "not an nvcim image",
                 ("--tcp", "0", "--token", "a b"): "token must be 1..128 characters",
                 ("--tcp", str(port)): "Address already in use"}
        for args, message in cases.items():
            result = _cli_error(list(args))
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1, (args, result.output)
            assert lines[0].startswith("Error: ") and message in lines[0]
        with_debug = _cli_error(["--tcp", str(port)], debug=True)
        assert isinstance(with_debug.exception, OSError)  # --debug lets the exception (and traceback) through


# -- misbehaving clients, fuzzed: they never reach the chip, the server or the next client -------------------

KNOWN = bytes(range(256)) * 4  # what the staging buffer holds while the misbehaving clients come and go
KNOWN_AT = 4096                # (where no other test of the module writes)
SERVE_TALLY: collections.Counter = collections.Counter()

client_action = st.one_of(
    st.tuples(st.just("half frame"), st.integers(1, (64 << 10) + 15), st.booleans()),
    st.tuples(st.just("replies pending"), st.integers(1, 32), st.booleans()),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=4096), st.booleans()),
    st.tuples(st.just("second host"), st.integers(0, 0xFFFE), st.booleans()),
)


def _exchange(sock: socket.socket, command: Command, payload: bytes, seq: int = 1):
    """One request on a raw connection, and its reply frame."""
    sock.sendall(encode(command, seq, payload))
    reader = FrameReader()
    while not (items := reader.feed(sock.recv(1 << 16))):
        pass
    return items[0]


def _served(sock: socket.socket, command: Command, payload: bytes, tries: int = 10_000):
    """``_exchange``, again while the reply is BUSY: a client that just left may still have
    requests on the chip (they finish first). ``tries`` only keeps a hung server from hanging the test."""
    for seq in range(1, tries + 1):
        reply = _exchange(sock, command, payload, seq)
        if not _busy(reply):
            SERVE_TALLY["BUSY while a gone client's requests finished"] += seq - 1
            return reply
        time.sleep(0.001)
    raise AssertionError(f"{command.name}: still BUSY after {tries} tries")


def _busy(reply) -> bool:
    return reply.is_error and reply.error()[0] == ErrorCode.BUSY


def _misbehave(server: Server, action: tuple) -> None:
    kind, arg, reset = action
    if kind == "second host":  # while one host holds the chip, another sends a frame: BUSY, nothing else
        with socket.create_connection(server.address) as holder:
            assert not _served(holder, Command.PING, b"mine").is_error
            with socket.create_connection(server.address) as other:  # only now: the holder is known
                reply = _exchange(other, Command.BUF_WRITE, BufWriteHeader.build(dict(offset=KNOWN_AT)) + b"\xee" * 64,
                                  arg)
            assert _busy(reply), reply
        SERVE_TALLY[kind] += 1
        return
    with socket.create_connection(server.address) as sock:
        if kind == "half frame":
            frame = encode(Command.BUF_WRITE, 1, BufWriteHeader.build(dict(offset=KNOWN_AT)) + b"\x5a" * (64 << 10))
            sock.sendall(frame[:arg])
        elif kind == "replies pending":
            sock.sendall(b"".join(encode(Command.PING, seq, bytes(2048)) for seq in range(1, arg + 1)))
        else:
            sock.sendall(arg)
        if reset:
            _reset_on_close(sock)
    SERVE_TALLY[f"{kind}, {'reset' if reset else 'close'}"] += 1


@pytest.fixture(scope="module")
def known_buffer(server) -> bytes:
    with driver.open(server.url, timeout=2) as dev:
        dev.buffer_write(KNOWN, offset=KNOWN_AT)
    return KNOWN


@fuzz(fast=25, long=4000)
@given(actions=st.lists(client_action, min_size=1, max_size=4))
def test_misbehaving_clients_never_reach_the_chip_or_the_next_client(server, known_buffer, actions):
    for action in actions:
        _misbehave(server, action)
    with socket.create_connection(server.address) as sock:  # the next well-behaved client, served at once
        reply = _served(sock, Command.BUF_READ, BufReadArgs.build(dict(offset=KNOWN_AT, length=len(known_buffer))))
        assert bytes(reply.payload) == known_buffer
    assert server.alive()
    SERVE_TALLY["well-behaved clients after them, served right"] += 1


@pytest.fixture(scope="module", autouse=True)
def _print_serve_tally():
    yield
    if SERVE_TALLY:
        print("\nserving fuzz:", dict(sorted(SERVE_TALLY.items())))
