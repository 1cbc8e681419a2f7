"""Backing the cell planes' memory pages before the cells are written.

The chip's planes (conductance, noise, target, programming time) are ``np.zeros`` arrays:
the system maps their pages on first write, so a large chip that holds a small program
costs only what the program touches. On a virtual machine that first write is slow (a
full-width VGG-8 writes 52 M cells, about 680 MB of planes; faulting them in took 0.9-1.7 s
of a 3-4 s deploy here), and it falls on the thread that programs the cells.

When a program is loaded the chip knows which arrays its cells will go to, so a
background thread asks the system to back those arrays' pages (Linux
``madvise(MADV_POPULATE_WRITE)``, kernel 5.14 or later) while the host is still streaming
cells: the writes then find their pages ready. Populating never changes a page's contents,
so it may run alongside writes to the same pages. Where the call is not available it does
nothing and the writes fault their pages in as before.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["back_in_background", "runs", "supported"]

_POPULATE_WRITE = 23      # MADV_POPULATE_WRITE (Linux 5.14+)


def _madvise():
    """The C library's madvise if it populates pages here (tried once on a page of our own), else None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.madvise
    except (OSError, AttributeError):  # no C library to ask (not a POSIX system)
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int
    probe = np.zeros(2 * mmap.PAGESIZE, np.uint8)
    start = -(-probe.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    return call if call(start, mmap.PAGESIZE, _POPULATE_WRITE) == 0 else None


_MADVISE = _madvise()


def supported() -> bool:
    """Whether this system backs pages on request (else ``back_in_background`` does nothing)."""
    return _MADVISE is not None


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices as half-open runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _populate(views: Sequence[np.ndarray]) -> None:
    page = mmap.PAGESIZE
    for view in views:
        start = -(-view.ctypes.data // page) * page          # whole pages inside the view only
        stop = (view.ctypes.data + view.nbytes) // page * page
        if stop > start and _MADVISE(start, stop - start, _POPULATE_WRITE) != 0:
            return                                           # not supported here (or refused): writes fault as before


def back_in_background(views: Sequence[np.ndarray]) -> threading.Thread | None:
    """Start backing the pages of the given contiguous views on a daemon thread (None where the
    system offers no such call). The thread holds the views, so their memory outlives it."""
    if _MADVISE is None or not views:
        return None
    if not all(v.flags.c_contiguous for v in views):
        raise ValueError("page backing needs contiguous views")
    thread = threading.Thread(target=_populate, args=(list(views),), name="nvcim-pages", daemon=True)
    thread.start()
    return thread
