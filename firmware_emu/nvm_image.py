"""The chip's non-volatile image on disk: cells, noise dump and loaded program survive a power cycle.

The image is a directory. ``manifest.json`` names the files that make up the current
state: one ``.npz`` per non-erased array (conductance, target, captured noise, programming
time) and the loaded program's code; it also holds the retention clock. Every update writes new files under new names, then swaps the
manifest with an atomic rename. A process killed at any moment therefore leaves either
the old manifest or the new one, each pointing at complete files: never a torn image.
Files the manifest no longer names are removed after the swap, or at the next load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
IMAGE_VERSION = 1


class ImageError(ValueError):
    """The image cannot be used; the message names the file and what is wrong."""


@dataclass
class ImageState:
    config: dict
    # g, target, noise, programming time (zeros in an image written before cells were stamped)
    arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    program_code: bytes | None = None
    rng_state: dict | None = None
    clock: int = 0  # CLOCK, seconds


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class NvmImage:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.generation = 0
        self._files: dict[str, str] = {}  # key ("array:3", "program") -> file name in use

    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def load(self) -> ImageState:
        manifest_path = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ImageError(f"{manifest_path}: unreadable image manifest ({e})") from None
        if manifest.get("version") != IMAGE_VERSION:
            raise ImageError(f"{manifest_path}: image version {manifest.get('version')}, expected {IMAGE_VERSION}")
        self.generation = manifest["generation"]
        self._files = dict(manifest["files"])
        state = ImageState(config=manifest["config"], rng_state=manifest.get("rng_state"),
                           clock=manifest.get("clock", 0))
        for key, name in self._files.items():
            file = self.path / name
            try:
                if key == "program":
                    state.program_code = file.read_bytes()
                else:
                    with np.load(file) as z:
                        stamps = z["programmed_at"] if "programmed_at" in z.files else np.zeros(z["g"].shape, np.uint32)
                        state.arrays[int(key.split(":")[1])] = (z["g"], z["target"], z["noise"], stamps)
            except (OSError, KeyError, ValueError) as e:
                raise ImageError(f"{file}: image file named by the manifest is unreadable ({e})") from None
        self._remove_unreferenced()
        return state

    def commit(self, config: dict, arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None],
               program_code: bytes | None | bool, rng_state: dict, clock: int = 0) -> None:
        """Write the changed parts and swap the manifest.

        ``arrays`` maps each changed array to its (g, target, noise, programming time) planes,
        or None when it is now erased; ``program_code`` is the new code, or False when it did
        not change; ``clock`` is the retention clock now.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        gen = self.generation + 1
        files = dict(self._files)
        for index, planes in arrays.items():
            key = f"array:{index}"
            if planes is None:
                files.pop(key, None)
                continue
            name = f"array{index:05d}.{gen}.npz"
            g, target, noise, programmed_at = planes
            with open(self.path / name, "wb") as f:
                np.savez(f, g=g, target=target, noise=noise, programmed_at=programmed_at)
                f.flush()
                os.fsync(f.fileno())
            files[key] = name
        if program_code is not False:
            if program_code is None:
                files.pop("program", None)
            else:
                name = f"program.{gen}.bin"
                _fsync_write(self.path / name, program_code)
                files["program"] = name
        manifest = dict(version=IMAGE_VERSION, generation=gen, config=config, files=files, rng_state=rng_state,
                        clock=clock)
        tmp = self.path / (MANIFEST + ".tmp")
        _fsync_write(tmp, json.dumps(manifest, indent=1).encode())
        os.replace(tmp, self.path / MANIFEST)
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.generation, self._files = gen, files
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        keep = set(self._files.values()) | {MANIFEST}
        for file in self.path.iterdir():
            if file.name not in keep and (file.suffix in (".npz", ".bin", ".tmp")):
                file.unlink(missing_ok=True)
