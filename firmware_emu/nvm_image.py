"""The chip's non-volatile image on disk: cells, noise dump and loaded program survive a power cycle.

The image owns its directory. It holds a marker (``nvcim-image.json``), a manifest
(``manifest.json``) and the files the manifest names: one ``.npz`` per non-erased array
(conductance, target, captured noise, programming time) and the loaded program's code.
The manifest also holds the chip's configuration, random generator state and retention
clock, the size and SHA-256 of every file it names, and the SHA-256 of its own contents.

Atomic: every update writes new files under new names, then swaps the manifest with an
atomic rename, so a process killed at any moment leaves the old manifest or the new one,
each naming complete files. A new image is built in a sibling directory and renamed into
place: marker and first manifest appear together or not at all.

Never losing or inventing data: a directory without the marker is used only when it is
absent or empty; with the marker, a missing or damaged manifest or file is an
``ImageError`` naming it, and nothing on disk changes (never a blank chip). The manifest
may name only the image's own file names (no path), and the image only ever removes
files of those names that the manifest no longer names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MARKER = "nvcim-image.json"
MANIFEST = "manifest.json"
FORMAT = "nvcim-nvm-image"
IMAGE_VERSION = 2
MAX_MANIFEST_BYTES = 16 << 20  # a manifest naming every array of the largest chip is ~8 MB
# the names the image writes: the only ones a manifest may name, the only ones ever removed
_ARRAY_FILE = re.compile(r"array(\d{5})\.g\d{1,12}\.npz")
_PROGRAM_FILE = re.compile(r"program\.g\d{1,12}\.bin")
_OWN_FILES = (_ARRAY_FILE, _PROGRAM_FILE, re.compile(re.escape(MANIFEST) + r"\.tmp"))
PLANES = {"g": np.float32, "target": np.uint8, "noise": np.float32, "programmed_at": np.uint32}


class ImageError(ValueError):
    """The image cannot be used; the message names the file and what is wrong."""


@dataclass
class ImageState:
    config: dict
    # g, target, noise, programming time, as stored (their shapes are the reader's to check)
    arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    program_code: bytes | None = None
    rng_state: dict | None = None
    clock: int = 0  # CLOCK, seconds
    files: dict[str, Path] = field(default_factory=dict)  # key ("array:3", "program") -> file, for messages


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _canonical(body: dict) -> bytes:
    """The bytes the manifest's checksum covers: its contents, independent of layout."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _read_own(path: Path, limit: int) -> bytes:
    """A file of the image, not followed through a link, refused when larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ImageError(f"{path}: damaged or not the image's ({size} bytes, more than the {limit} expected)")
        return f.read()


def _file_key(key: str, name: object) -> str | None:
    """Why a manifest entry (key -> file name) is not one the image writes, or None."""
    if not isinstance(name, str):
        return f"file name {name!r} is not a string"
    m = _ARRAY_FILE.fullmatch(name)
    if key == "program":
        return None if _PROGRAM_FILE.fullmatch(name) else f"program file name {name!r} is not program.gN.bin"
    if m is None or key != f"array:{int(m.group(1))}":
        return f"entry {key!r} -> {name!r} is not 'array:N' -> arrayNNNNN.gG.npz (names stay inside the image)"
    return None


class NvmImage:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.generation = 0
        self._files: dict[str, dict] = {}  # key ("array:3", "program") -> {"name", "size", "sha256"} in use

    def exists(self) -> bool:
        """True for an image; False for a directory that is absent or empty (a new image goes
        there); an ImageError for anything else, which the image will not touch."""
        if (self.path / MARKER).is_file():
            return True
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            raise ImageError(f"{self.path}: not a directory; an image needs a directory of its own")
        entries = sorted(p.name for p in self.path.iterdir())
        if not entries:
            return False
        if MANIFEST in entries:
            raise ImageError(f"{self.path}: has a {MANIFEST} but no {MARKER}: an image written by an older nvcim "
                             f"(no checksums), which this version does not read, or not an image; deploy again "
                             f"into a new directory")
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ImageError(f"{self.path}: not an nvcim image (no {MARKER}) and not empty ({shown}): refusing to use "
                         f"it, so as not to touch files the image did not write; give an empty or new directory")

    def load(self) -> ImageState:
        """The stored state, every file checked against its size and SHA-256 in the manifest;
        an ImageError naming the first file that is missing or damaged. Changes nothing on disk."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise ImageError(f"{manifest_path}: missing from the image (its {MARKER} is there): refusing to power up "
                             f"a blank chip over its data; restore the manifest, or use a new directory")
        try:
            outer = json.loads(_read_own(manifest_path, MAX_MANIFEST_BYTES))
            body = outer["image"]
            digest = hashlib.sha256(_canonical(body)).hexdigest()
            if outer.get("format") != FORMAT or outer.get("version") != IMAGE_VERSION:
                raise ImageError(f"{manifest_path}: format {outer.get('format')!r} version {outer.get('version')!r}, "
                                 f"expected {FORMAT!r} version {IMAGE_VERSION}")
            if outer.get("sha256") != digest:
                raise ImageError(f"{manifest_path}: damaged (its contents do not match its SHA-256)")
            generation, files = body["generation"], body["files"]
            config, clock = body["config"], body["clock"]
            if not (isinstance(generation, int) and generation >= 0 and isinstance(files, dict)
                    and isinstance(config, dict) and isinstance(clock, int)):
                raise ImageError(f"{manifest_path}: generation, files, config or clock has the wrong type or sign")
        except ImageError:
            raise
        except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise ImageError(f"{manifest_path}: unreadable image manifest ({type(e).__name__}: {e})") from None
        state = ImageState(config=config, rng_state=body.get("rng_state"), clock=clock)
        for key, entry in files.items():
            problem = _file_key(key, entry.get("name") if isinstance(entry, dict) else None)
            if problem is None and not (isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
                problem = f"entry {key!r} lacks its size or SHA-256"
            if problem:
                raise ImageError(f"{manifest_path}: {problem}")
            file = state.files[key] = self.path / entry["name"]
            try:
                data = _read_own(file, entry["size"])
            except OSError as e:
                raise ImageError(f"{file}: image file named by the manifest is unreadable "
                                 f"({e.strerror or e})") from None
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ImageError(f"{file}: damaged ({len(data)} bytes; size or SHA-256 differs from the manifest's)")
            if key == "program":
                state.program_code = data
            else:
                state.arrays[int(key.split(":")[1])] = _planes(file, data)
        self.generation, self._files = generation, dict(files)
        return state

    def commit(self, config: dict, arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None],
               program_code: bytes | None | bool, rng_state: dict, clock: int = 0) -> None:
        """Write the changed parts and swap the manifest (the first commit creates the image).

        ``arrays`` maps each changed array to its (g, target, noise, programming time) planes,
        or None when it is now erased; ``program_code`` is the new code, or False when it did
        not change; ``clock`` is the retention clock now.
        """
        new = self.generation == 0 and not self.exists()
        if new:  # built beside, renamed into place (rename replaces an empty directory)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = self.path.parent / f".{self.path.name}.new-{os.getpid()}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            _fsync_write(target / MARKER, json.dumps(dict(format=FORMAT, version=IMAGE_VERSION)).encode())
        else:
            target = self.path
        gen = self.generation + 1
        files = dict(self._files)
        for index, planes in arrays.items():
            key = f"array:{index}"
            if planes is None:
                files.pop(key, None)
                continue
            buf = io.BytesIO()
            np.savez(buf, **dict(zip(PLANES, planes, strict=True)))
            files[key] = self._write_file(target, f"array{index:05d}.g{gen}.npz", buf.getvalue())
        if program_code is not False:
            if program_code is None:
                files.pop("program", None)
            else:
                files["program"] = self._write_file(target, f"program.g{gen}.bin", program_code)
        body = dict(generation=gen, config=config, files=files, rng_state=rng_state, clock=clock)
        manifest = dict(format=FORMAT, version=IMAGE_VERSION, sha256=hashlib.sha256(_canonical(body)).hexdigest(),
                        image=body)
        tmp = target / (MANIFEST + ".tmp")
        _fsync_write(tmp, json.dumps(manifest, indent=1).encode())
        os.replace(tmp, target / MANIFEST)
        _fsync_dir(target)
        if new:
            try:
                os.rename(target, self.path)
            except OSError as e:  # the directory gained files meanwhile: leave them, and say so
                shutil.rmtree(target, ignore_errors=True)
                raise ImageError(f"{self.path}: cannot create the image there ({e.strerror or e})") from None
            _fsync_dir(self.path.parent)
        self.generation, self._files = gen, files
        self.sweep()

    @staticmethod
    def _write_file(directory: Path, name: str, data: bytes) -> dict:
        _fsync_write(directory / name, data)
        return dict(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def sweep(self) -> None:
        """Remove the image's own files the manifest does not name (left by a commit a crash cut
        short); any other file in the directory is not the image's and stays."""
        keep = {entry["name"] for entry in self._files.values()}
        for file in self.path.iterdir():
            if file.name not in keep and any(p.fullmatch(file.name) for p in _OWN_FILES):
                file.unlink(missing_ok=True)


def _planes(file: Path, data: bytes) -> tuple[np.ndarray, ...]:
    """An array file's planes (g, target, noise, programming time), each of its stored type."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            planes = tuple(np.asarray(z[name]) for name in PLANES)
    except Exception as e:  # a file's contents: any failure to parse them means a damaged file
        raise ImageError(f"{file}: not an array file of the image ({type(e).__name__}: {e})") from None
    for (name, dtype), plane in zip(PLANES.items(), planes, strict=True):
        if plane.dtype != dtype or plane.ndim != 2 or plane.shape != planes[0].shape:
            raise ImageError(f"{file}: plane {name} is {plane.dtype}{list(plane.shape)}, expected {np.dtype(dtype)} "
                             f"and the shape of g")
    return planes
