"""Property tests of the image loader: whatever happens to an image's files, powering up gives
the stored chip or an ImageError naming a file of the image; never another exception, never
another chip, and a refusal changes nothing in the directory.

Three kinds of damage: bytes changed in any file (flips, overwrites, truncation, deletion,
garbage appended), several of those at once, and manifests edited by someone who knows the
format (values replaced by random JSON, then sealed again with a correct checksum). The
fast profile runs in the default suite; ``NVCIM_FUZZ=long`` selects the long one
(docs/reliability.md#image gives its figures), ``-s`` prints the tallies.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvcim import driver
from nvcim.firmware_emu.chip import Chip
from nvcim.firmware_emu.nvm_image import ImageError

from fuzzing import fuzz
from zoo import export_mlp

FUZZ = fuzz()

TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, str]:
    """A small image (an MLP's program and four programmed arrays) and its chip's fingerprint."""
    root = tmp_path_factory.mktemp("fuzz-image")
    model = export_mlp(root / "m.onnx", in_features=16, hidden=24, out=4)
    url = f"emu://?image={root / 'chip'}&arrays=8&rows=32&cols=32&buffer_size=65536&sigma=0.1&seed=3"
    with driver.load(model, device=url):
        pass
    yield root / "chip", _fingerprint(Chip.with_image(str(root / "chip"), {}))
    if TALLY:
        print("\nimage fuzz:", dict(sorted(TALLY.items())))


def _fingerprint(chip: Chip) -> str:
    """Everything a power-up restores: configuration, cells, programming times, program, clock."""
    h = hashlib.sha256(repr(chip.config).encode())
    for plane in (chip.cells.g, chip.cells.target, chip.cells.noise, chip.cells.ages.programmed_at):
        h.update(np.ascontiguousarray(plane).tobytes())
    h.update(chip.program_code or b"")
    h.update(str(chip.registers.regs["CLOCK"]).encode())
    return h.hexdigest()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _power_up(image: Path, damage, kind: str) -> str | None:
    """Copy the image, damage the copy, power up: the chip's fingerprint, or None if refused
    (after checking the refusal names a file of the image and left the directory as it was)."""
    work = Path(tempfile.mkdtemp(prefix="nvcim-fuzz-")) / "chip"
    try:
        shutil.copytree(image, work)
        damage(work)
        before = _files(work)
        try:
            chip = Chip.with_image(str(work), {})
        except ImageError as e:
            assert str(work) in str(e), f"the error names no file of the image: {e}"
            assert _files(work) == before, "a refused power-up changed the directory"
            TALLY[f"{kind}: refused"] += 1
            return None
        TALLY[f"{kind}: powered up"] += 1
        return _fingerprint(chip)
    finally:
        shutil.rmtree(work.parent)


# -- bytes changed in the files --------------------------------------------------------------------------

OPS = ("flip", "overwrite", "truncate", "delete", "append")
byte_damage = st.tuples(st.integers(0, 1 << 30), st.sampled_from(OPS), st.integers(0, 1 << 30),
                        st.binary(min_size=1, max_size=64))


def _damage_bytes(work: Path, which: int, op: str, where: int, data: bytes) -> None:
    files = sorted(work.iterdir())
    file = files[which % len(files)]
    content = bytearray(file.read_bytes())
    at = where % max(len(content), 1)
    if op == "delete":
        file.unlink()
        return
    if op == "flip" and content:
        content[at] ^= 1 << (where % 8)
    elif op == "overwrite":
        content[at:at + len(data)] = data
    elif op == "truncate":
        del content[at:]
    elif op == "append":
        content += data
    file.write_bytes(bytes(content))


@FUZZ
@given(damage=byte_damage)
def test_damaged_bytes_give_the_stored_chip_or_a_named_refusal(image, damage):
    path, stored = image
    result = _power_up(path, lambda work: _damage_bytes(work, *damage), "bytes")
    assert result in (None, stored), "a damaged image powered up another chip"


@FUZZ
@given(damages=st.lists(byte_damage, min_size=2, max_size=4))
def test_several_damages_at_once_give_the_stored_chip_or_a_named_refusal(image, damages):
    def damage(work: Path) -> None:
        for d in damages:
            if any(work.iterdir()):
                _damage_bytes(work, *d)
    path, stored = image
    assert _power_up(path, damage, "several") in (None, stored), "a damaged image powered up another chip"


# -- manifests edited and sealed again ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["../../../../etc/hostname", "/etc/hostname", "program.g2.bin",
                                              "array00000.g1.npz", "manifest.json", "nvcim-image.json"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6)


def _paths(value, prefix=()):
    """Every path to a value inside the manifest's contents."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _reseal(work: Path, pick: int, new_value, delete: bool) -> None:
    outer = json.loads((work / "manifest.json").read_text())
    paths = [p for p in _paths(outer["image"]) if p]
    path = paths[pick % len(paths)]
    parent = outer["image"]
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new_value
    canonical = json.dumps(outer["image"], sort_keys=True, separators=(",", ":")).encode()
    outer["sha256"] = hashlib.sha256(canonical).hexdigest()
    (work / "manifest.json").write_text(json.dumps(outer))


@FUZZ
@given(pick=st.integers(0, 1 << 30), new_value=json_values, delete=st.booleans())
def test_a_resealed_manifest_never_gives_a_traceback(image, pick, new_value, delete):
    path, _ = image
    _power_up(path, lambda work: _reseal(work, pick, new_value, delete), "resealed")
