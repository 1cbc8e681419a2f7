"""Serve a chip on a pseudo-terminal or a TCP port, as a bench would expose a board.

The chip runs in this process; a host reaches it with plain pyserial:
``serial.Serial('/dev/pts/N')`` or ``serial.serial_for_url('socket://127.0.0.1:PORT')``.

On TCP one host holds the chip at a time (a session lock): the first to connect (having
sent the token line, when the server has a token) until it disconnects, or until it has
been idle for ``idle_timeout`` seconds and another host connects. Every frame another host
sends meanwhile is answered at once with BUSY naming the holder. Each connection parses
its own frames, and a new holder starts with a clean frame parser and reply cache, so a
client that disconnects, resets or stops halfway through a frame never affects the chip
or the next client. Connections come and go in the log; none can stop the server.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import pty
import select
import socket
import threading
import time
import tty
from collections.abc import Callable

from .chip import Chip
from .contract.access import MAX_PREAMBLE, TOKEN_PREFIX
from .contract.protocol import ErrorCode, Frame
from .errors import ChipError
from .frame_server import FrameServer
from .link_faults import LinkFaults

CHUNK = 1 << 16
MAX_CONNECTIONS = 32          # open connections at once; more are closed at once
DEFAULT_IDLE_TIMEOUT = 60.0   # seconds
IDLE_TIMEOUT_RANGE = (0.1, 86400.0)
GONE_HOLDER_WAIT = 1.0        # seconds a host waits for the request of a holder that hung up to end
DENIED_REPLIES, DENIED_LINGER = 4, 2.0  # a host without the token: frames answered, seconds waited for one

log = logging.getLogger("nvcim.serve")


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


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (only this machine can connect)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class _Connection:
    """One TCP client: its socket and its activity, which the session lock reads."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self.connected = self.last_active = time.monotonic()
        self.in_request = False  # the chip is working on a request of this connection

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_request else now - self.last_active

    def gone(self) -> bool:
        """The client has hung up, though its thread may not have read that far yet."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed by its thread meanwhile
            return True


class SessionLock:
    """Which connection holds the chip; an idle holder gives way to the next host that asks.

    ``on_take(conn)`` runs (under the lock) whenever a connection takes the chip.
    """

    def __init__(self, idle_timeout: float, on_take: Callable[[_Connection], None]):
        self.idle_timeout, self.on_take = idle_timeout, on_take
        self.holder: _Connection | None = None
        self._lock = threading.Condition()

    def take(self, conn: _Connection) -> bool:
        """True if ``conn`` holds the chip now: it did, or the chip was free, or its holder idle."""
        with self._lock:
            return self._take(conn)

    def enter(self, conn: _Connection) -> bool:
        """As ``take``, and if True a request of ``conn`` runs until ``leave``: it is not idle."""
        with self._lock:
            conn.in_request = self._take(conn)
            return conn.in_request

    def leave(self, conn: _Connection) -> None:
        with self._lock:
            conn.in_request, conn.last_active = False, time.monotonic()
            self._lock.notify_all()

    def release(self, conn: _Connection) -> None:
        with self._lock:
            if self.holder is conn:
                self.holder = None

    def describe(self) -> str:
        with self._lock:
            holder, now = self.holder, time.monotonic()
            if holder is None:
                return "the chip was busy and is free now: try again"
            return (f"the chip is held by {holder.peer} (connected {now - holder.connected:.1f} s ago, idle "
                    f"{holder.idle_for(now):.1f} s; an idle holder gives way after {self.idle_timeout:g} s): "
                    f"try again later")

    def _take(self, conn: _Connection) -> bool:
        holder = self.holder
        if holder is conn:
            return True
        if holder is not None and holder.in_request and holder.gone():  # its last request is ending: wait for it
            self._lock.wait_for(lambda: self.holder is not holder or not holder.in_request, GONE_HOLDER_WAIT)
            holder = self.holder
            if holder is conn:
                return True
        now = time.monotonic()
        if holder is not None:
            if holder.in_request:
                return False
            if holder.gone():
                log.info("%s has hung up: the chip goes to %s", holder.peer, conn.peer)
            elif holder.idle_for(now) < self.idle_timeout:
                return False
            else:
                log.info("%s idle for %.1f s: gives the chip to %s", holder.peer, holder.idle_for(now), conn.peer)
        self.holder = conn
        self.on_take(conn)
        log.info("%s holds the chip", conn.peer)
        return True


def _refusing(code: ErrorCode, message: Callable[[], str]) -> FrameServer:
    """A frame parser for one connection that answers every intact frame with error ``code``."""
    def refuse(frame: Frame) -> tuple[bytes, bool]:
        raise ChipError(code, message())
    return FrameServer(refuse, lambda error: None, contextlib.nullcontext)


def _read_token_line(sock: socket.socket, data: bytes) -> tuple[str | None, bytes]:
    """Split a leading token line off the connection's first bytes (reading more while they
    could still be one): (the token or None, the bytes after it)."""
    while len(data) < MAX_PREAMBLE and TOKEN_PREFIX.startswith(data[:len(TOKEN_PREFIX)]) and b"\n" not in data:
        more = sock.recv(CHUNK)
        if not more:
            break
        data += more
    if data.startswith(TOKEN_PREFIX) and b"\n" in data[:MAX_PREAMBLE]:
        line, rest = data.split(b"\n", 1)
        return line[len(TOKEN_PREFIX):].decode("ascii", "replace"), rest
    return None, data


class TcpServer:
    """The TCP side of a served chip: connections, the session lock, the token."""

    def __init__(self, chip: Chip, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, token: str | None = None,
                 faults: float = 0.0, seed: int = 0):
        self.chip, self.token = chip, token
        self.lock = SessionLock(idle_timeout, lambda conn: chip.frames.reset())
        self.to_chip, self.from_chip = LinkFaults(faults, seed), LinkFaults(faults, seed + 1)
        self._open = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def serve_forever(self, host: str, port: int, announce: Callable[[str], None]) -> None:
        """Listen on host:port, announce the ``socket://`` URL, serve each client on a thread of its own."""
        with socket.create_server((host, port)) as server:
            announce(f"socket://{host}:{server.getsockname()[1]}")
            while True:
                sock, address = server.accept()
                peer = f"{address[0]}:{address[1]}"
                if not self._open.acquire(blocking=False):
                    log.warning("%s refused: %d connections are open", peer, MAX_CONNECTIONS)
                    sock.close()
                    continue
                threading.Thread(target=self._serve_connection, args=(sock, peer), daemon=True,
                                 name=f"client {peer}").start()

    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        conn = _Connection(sock, peer)
        busy = _refusing(ErrorCode.BUSY, self.lock.describe)
        try:
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                log.info("%s connected", peer)
                if self.token is not None:
                    sock.settimeout(self.lock.idle_timeout)  # for its token line only
                elif not self.lock.take(conn):  # a host holds the chip from its connection on
                    log.info("%s: %s; its frames are answered BUSY", peer, self.lock.describe())
                token, data = _read_token_line(sock, sock.recv(CHUNK))
                if self.token is not None:
                    if token is None or not hmac.compare_digest(token.encode(), self.token.encode()):
                        self._deny(conn, data, "no token line" if token is None else "wrong token")
                        return
                    sock.settimeout(None)
                    self.lock.take(conn)
                if token is not None and not data:
                    data = sock.recv(CHUNK)
                while data:
                    self._handle(conn, busy, data)
                    data = sock.recv(CHUNK)
            log.info("%s disconnected", peer)
        except TimeoutError:
            log.info("%s sent no token line within %g s: disconnected", peer, self.lock.idle_timeout)
        except OSError as e:  # reset, broken pipe: the client is gone; the chip and the server stay
            log.info("%s lost: %s", peer, e.strerror or e)
        except Exception:  # a fault of this server: this connection ends, the others and the chip go on
            log.exception("%s: internal error, connection closed", peer)
        finally:
            self.lock.release(conn)
            self._open.release()

    def _handle(self, conn: _Connection, busy: FrameServer, data: bytes) -> None:
        """``conn``'s bytes to the chip if it holds it or can take it at a frame boundary, else BUSY."""
        if not busy.mid_frame and self.lock.enter(conn):
            try:
                reply = self.from_chip(self.chip.feed(self.to_chip(data)))
            finally:
                self.lock.leave(conn)
        else:
            reply = busy.feed(data)
        if reply:
            conn.sock.sendall(reply)

    def _deny(self, conn: _Connection, data: bytes, why: str) -> None:
        """Answer the first frame of a host without the token, then hang up."""
        log.warning("%s refused: %s", conn.peer, why)
        denied = _refusing(ErrorCode.BAD_ARGUMENT, lambda: f"access denied ({why}): this server serves hosts that "
                                                           f"send its token first (socket://HOST:PORT?token=T)")
        conn.sock.settimeout(DENIED_LINGER)
        with contextlib.suppress(OSError):  # a timeout included
            for _ in range(DENIED_REPLIES):  # the host may ask what went wrong (the driver reads STATUS)
                while not (reply := denied.feed(data)):
                    data = conn.sock.recv(CHUNK)
                    if not data:
                        return
                conn.sock.sendall(reply)
                data = b""
