"""On-disk cache of compiled programs, keyed by the model, the chip and the compiler.

Placing a large model (quantising, slicing and packing every weight) takes seconds; a
host that reloads the same model onto the same kind of chip should not pay it twice.
The key covers the model's bytes, the chip geometry, the compile options and the
compiler's own source, so a changed compiler never serves a stale program.

Normalising a model (checking, shape inference, folding: about half a second for VGG-8)
is not paid twice either: the bytes a model was given as map to a short description of
the normalised model (its inputs, outputs and metadata, no weights) and its digest, the
program key's model part.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

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


def model_digest(model: onnx.ModelProto) -> bytes:
    """The normalised model's part of a program key (the compiler's source included)."""
    h = hashlib.sha256(_compiler_fingerprint())
    h.update(model.SerializeToString())
    return h.digest()


def _source_path(source: bytes) -> Path:
    # the normaliser's libraries count too: another onnx could normalise the same bytes otherwise
    h = hashlib.sha256(_compiler_fingerprint() + f"onnx {onnx.__version__} numpy {np.__version__}".encode())
    h.update(source)
    return cache_dir() / f"{h.hexdigest()}.nvcm"


def known_model(source: bytes) -> tuple[onnx.ModelProto, bytes] | None:
    """(description, digest) of the model these bytes normalised to before, or None."""
    path = _source_path(source)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        description = onnx.ModelProto.FromString(data[32:])
    except (OSError, DecodeError) as e:
        log.warning("ignoring damaged cache entry %s: %s", path, e)
        return None
    if len(data) < 32 or not description.graph.output:
        log.warning("ignoring damaged cache entry %s", path)
        return None
    return description, data[:32]


def remember_model(source: bytes, model: onnx.ModelProto, digest: bytes) -> None:
    """Record that ``source`` normalises to ``model`` (digest ``digest``): its description, not its weights."""
    initializers = {t.name for t in model.graph.initializer}
    description = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                                  producer_version=model.producer_version, domain=model.domain,
                                  model_version=model.model_version, doc_string=model.doc_string)
    description.opset_import.extend(model.opset_import)
    description.metadata_props.extend(model.metadata_props)
    description.graph.name = model.graph.name
    description.graph.input.extend(v for v in model.graph.input if v.name not in initializers)
    description.graph.output.extend(model.graph.output)
    _store(_source_path(source), digest + description.SerializeToString())


def _store(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # a read-only or full disk must not stop inference
        log.warning("could not write compile cache %s: %s", path, e)


def cached_program(digest: bytes, target: compiler.Target, options: dict,
                   build: Callable[[], Program]) -> Program:
    """The program for this model (``model_digest``)/chip/options from the cache, else ``build()`` it and store it."""
    key = hashlib.sha256(digest + repr((target, sorted(options.items()))).encode())
    path = cache_dir() / f"{key.hexdigest()}.nvcp"
    if path.is_file():
        try:
            program = Program.from_bytes(path.read_bytes())
            log.info("compiled program from cache %s", path)
            return program
        except ProgramFormatError as e:
            log.warning("ignoring damaged cache entry %s: %s", path, e)
    program = build()
    _store(path, program.to_bytes())
    return program
