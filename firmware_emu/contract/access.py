"""Who may reach a served chip: the shared-token line a host sends before its first frame.

A server started with a token (``serve --tcp PORT --token T``) serves only hosts whose
first bytes on the connection are the ASCII line ``NVCIM-TOKEN T`` ended by LF; any other
host has its first frame refused and is disconnected. A host gives the token in the URL,
``socket://HOST:PORT?token=T``; the driver removes it from the URL and sends the line.
The characters a token may hold cannot start a frame, so a server without a token can
skip the line. Described in docs/protocol.md#serving-over-tcp.
"""

from __future__ import annotations

import re
import urllib.parse

TOKEN_PREFIX = b"NVCIM-TOKEN "
MAX_TOKEN = 128
TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")  # URL-safe, never 0xA5 (SYNC)
MAX_PREAMBLE = len(TOKEN_PREFIX) + MAX_TOKEN + 1


def check_token(token: str) -> str:
    """``token`` if a server can take it, else a ValueError saying what is wrong."""
    if not (1 <= len(token) <= MAX_TOKEN and TOKEN_CHARS.fullmatch(token)):
        raise ValueError(f"token must be 1..{MAX_TOKEN} characters of A-Z a-z 0-9 . _ ~ - (got {len(token)} "
                         f"characters{'' if TOKEN_CHARS.fullmatch(token or 'x') else ', some of them others'})")
    return token


def token_line(token: str) -> bytes:
    """What a host sends first to a server that has ``token``."""
    return TOKEN_PREFIX + check_token(token).encode() + b"\n"


def split_token(url: str) -> tuple[str, str | None]:
    """A ``socket://`` URL without its ``token`` option, and the token (None without one);
    other URLs come back as they are."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "socket" or not parts.query:
        return url, None
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    tokens = [v for k, v in query if k == "token"]
    if not tokens:
        return url, None
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "token"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), check_token(tokens[-1])
