"""Serve a chip on a pseudo-terminal or a TCP port, as a bench would expose a board.

The chip runs in this process; a host reaches it with plain pyserial:
``serial.Serial('/dev/pts/N')`` or ``serial.serial_for_url('socket://127.0.0.1:PORT')``.
"""

from __future__ import annotations

import os
import pty
import socket
import tty
from typing import Callable

from .chip import Chip
from .link_faults import LinkFaults

CHUNK = 1 << 16


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve_pty(chip: Chip, announce: Callable[[str], None], faults: float = 0.0, seed: int = 0) -> None:
    """Open a pty, announce the path of its device end, and answer frames forever.

    ``faults``: rate at which bytes are flipped, dropped or duplicated in each direction.
    """
    to_chip, from_chip = LinkFaults(faults, seed), LinkFaults(faults, seed + 1)
    master, slave = pty.openpty()
    tty.setraw(slave)  # no echo, no line editing, no CR/LF translation: bytes pass untouched
    announce(os.ttyname(slave))
    # Keeping the slave open means reads on the master block instead of failing with EIO
    # whenever no client has the port open.
    while True:
        data = os.read(master, CHUNK)
        reply = from_chip(chip.feed(to_chip(data)))
        if reply:
            _write_all(master, reply)


def serve_tcp(chip: Chip, host: str, port: int, announce: Callable[[str], None],
              faults: float = 0.0, seed: int = 0) -> None:
    """Listen on host:port, announce the ``socket://`` URL, serve one client at a time."""
    to_chip, from_chip = LinkFaults(faults, seed), LinkFaults(faults, seed + 1)
    with socket.create_server((host, port)) as server:
        announce(f"socket://{host}:{server.getsockname()[1]}")
        while True:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(CHUNK):
                    reply = from_chip(chip.feed(to_chip(data)))
                    if reply:
                        conn.sendall(reply)
