"""On-disk cache of compiled programs, keyed by the model, the chip and the compiler.

Placing a large model (quantising, slicing and packing every weight) takes seconds; a
host that reloads the same model onto the same kind of chip should not pay it twice.
The key covers the model's bytes, the chip geometry, the compile options and the
compiler's own source, so a changed compiler never serves a stale program.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

from nvcim import compiler
from nvcim.firmware_emu.contract import program_format
from nvcim.firmware_emu.contract.program_format import Program, ProgramFormatError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$NVCIM_CACHE, else $XDG_CACHE_HOME/nvcim, else ~/.cache/nvcim."""
    if os.environ.get("NVCIM_CACHE"):
        return Path(os.environ["NVCIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nvcim"


@lru_cache(maxsize=1)
def _compiler_fingerprint() -> bytes:
    h = hashlib.sha256()
    contract = Path(program_format.__file__).parent
    for path in sorted(Path(compiler.__file__).parent.glob("*.py")) + sorted(contract.glob("*.py")):
        h.update(path.read_bytes())
    return h.digest()


def cached_program(model_bytes: bytes, target: compiler.Target, options: dict,
                   build: Callable[[], Program]) -> Program:
    """The program for this model/chip/options from the cache, else ``build()`` it and store it."""
    key = hashlib.sha256(_compiler_fingerprint() + model_bytes + repr((target, sorted(options.items()))).encode())
    path = cache_dir() / f"{key.hexdigest()}.nvcp"
    if path.is_file():
        try:
            program = Program.from_bytes(path.read_bytes())
            log.info("compiled program from cache %s", path)
            return program
        except ProgramFormatError as e:
            log.warning("ignoring damaged cache entry %s: %s", path, e)
    program = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(program.to_bytes())
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full disk must not stop inference
        log.warning("could not write compile cache %s: %s", path, e)
    return program
