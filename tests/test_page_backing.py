"""The chip backs a loaded program's cell pages ahead of the writes, and never changes a cell doing so."""

from __future__ import annotations

import ctypes
import mmap
import zlib

import numpy as np

from nvcim.compiler import Target, compile_model
from nvcim.firmware_emu import page_backing
from nvcim.firmware_emu.chip import Chip, ChipConfig
from nvcim.firmware_emu.contract.protocol import Command, ProgramLoadArgs

from chip_programs import small_model

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident(view: np.ndarray) -> np.ndarray:
    """Per whole page inside ``view``: whether the system has it in memory (mincore)."""
    page = mmap.PAGESIZE
    start = -(-view.ctypes.data // page) * page
    stop = (view.ctypes.data + view.nbytes) // page * page
    pages = (stop - start) // page
    flags = (ctypes.c_ubyte * pages)()
    assert _LIBC.mincore(start, stop - start, flags) == 0, ctypes.get_errno()
    return np.frombuffer(flags, np.uint8) & 1 == 1


def test_runs_groups_consecutive_indices():
    assert page_backing.runs([7, 1, 3, 2, 3]) == [(1, 4), (7, 8)]
    assert page_backing.runs([]) == []
    assert page_backing.runs([5]) == [(5, 6)]


def test_backing_makes_pages_resident_and_keeps_their_contents():
    memory = mmap.mmap(-1, 64 * 256 * 256 * 4)             # 16 MB of fresh pages, none mapped yet
    plane = np.frombuffer(memory, np.float32).reshape(64, 256, 256)
    plane[3, 7, 9], plane[40, 0, 0] = 1.5, -2.0            # two pages written before
    thread = page_backing.back_in_background([plane[2:6], plane[40:41]])
    if not page_backing.supported():                       # the system offers no such call: nothing started
        assert thread is None
        return
    thread.join()
    assert resident(plane[2:6]).all() and resident(plane[40]).all()
    assert not resident(plane[50:64]).any()                # pages no one asked for stay unmapped
    assert plane[3, 7, 9] == 1.5 and plane[40, 0, 0] == -2.0
    assert np.count_nonzero(plane) == 2


def test_program_load_backs_the_arrays_its_tiles_use():
    # planes of 256 MB and more: always fresh mappings from the system, never reused heap pages
    geometry = dict(arrays=1024, rows=256, cols=256, weight_bits=8, cell_bits=2, buffer_size=1 << 16)
    program = compile_model(small_model(), Target(**geometry))
    used = sorted({t.array for layer in program.layers for t in layer.tiles})
    assert max(used) < 8
    chip = Chip(ChipConfig(**geometry))
    code = program.code_bytes()
    chip.buffer[:len(code)] = code
    chip.execute(Command.PROGRAM_LOAD, ProgramLoadArgs.build(dict(
        length=len(code), crc=zlib.crc32(code), weight_bits=8, cell_bits=2, array_rows=256, array_cols=256)))
    cells = chip.cells
    if not page_backing.supported():                       # nothing to ask the system: nothing started
        assert cells.backing is None
        return
    cells.backing.join()
    for plane in (cells.g, cells.noise, cells.ages.programmed_at):
        assert all(resident(plane[a]).all() for a in used)
        assert not resident(plane[512:]).any()             # arrays no tile uses stay unmapped
    assert not cells.g.any() and not cells.target.any()    # nothing was written
