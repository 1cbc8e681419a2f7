"""The non-volatile image: cells, noise dump and program survive a power cycle, atomically."""

import hashlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from nvcim import driver
from nvcim.firmware_emu.contract.protocol import CellQuantity

from polling import poll_until
from zoo import export_mlp


def _targets(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(1, 4, (256, 256)).astype(np.uint8)


def test_cells_noise_and_program_persist_across_processes(tmp_path, batch):
    path = export_mlp(tmp_path / "m.onnx")
    url = f"emu://?image={tmp_path / 'chip.nvm'}&sigma=0.3&seed=4"
    with driver.load(path, device=url) as sess:
        before = sess.run(None, {"x": batch})[0]
        noise = sess.device.read_cells(0, 0, 0, 64, 64, CellQuantity.NOISE)
    # a new process would do exactly this: power up from the image, no settings given
    with driver.open(f"emu://?image={tmp_path / 'chip.nvm'}") as dev:
        assert dev.read_register("SIGMA") == round(0.3 * 65536)
        assert np.array_equal(dev.read_cells(0, 0, 0, 64, 64, CellQuantity.NOISE), noise)
        program = dev.fetch_program()
        assert [layer.name for layer in program.layers] == [layer.name for layer in sess.program.layers]
        assert np.array_equal(dev.run([batch])[0], before)


def test_an_erase_after_power_up_clears_the_cells_the_image_restored(tmp_path):
    url = f"emu://?image={tmp_path / 'chip.nvm'}&arrays=2&rows=16&cols=16&sigma=0.1&seed=3"
    with driver.open(url) as dev:
        dev.write_cells(1, 0, 0, np.full((16, 16), 3, np.uint8))
    with driver.open(f"emu://?image={tmp_path / 'chip.nvm'}") as dev:       # the clock reads 0 again: no time let pass
        assert dev.read_cells(1, 0, 0, 16, 16, CellQuantity.TARGET).min() == 3
        dev.erase(1)
        for quantity in (CellQuantity.CONDUCTANCE, CellQuantity.NOISE, CellQuantity.TARGET):
            assert not dev.read_cells(1, 0, 0, 16, 16, quantity).any(), quantity.name


def test_geometry_of_an_existing_image_cannot_be_changed(tmp_path):
    with driver.open(f"emu://?image={tmp_path / 'c'}&arrays=4"):
        pass
    with pytest.raises(driver.LinkError, match="arrays=8 \\(image has 4\\)"):
        driver.open(f"emu://?image={tmp_path / 'c'}&arrays=8")


def test_crash_before_the_manifest_swap_leaves_the_previous_image(tmp_path, monkeypatch):
    url = f"emu://?image={tmp_path / 'c'}&sigma=0"
    with driver.open(url) as dev:
        dev.write_cells(0, 0, 0, _targets(0))
        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power lost")))
        with pytest.raises(driver.DeviceError, match="INTERNAL.*power lost"):
            dev.write_cells(1, 0, 0, _targets(1))
        monkeypatch.setattr(os, "replace", real_replace)
    with driver.open(f"emu://?image={tmp_path / 'c'}") as dev:
        assert np.array_equal(dev.read_cells(0, 0, 0, 256, 256), _targets(0))
        assert not dev.read_cells(1, 0, 0, 256, 256).any()
    # the half-written generation's files are swept at power-up: only what the manifest names remains
    names = [e["name"] for e in json.loads((tmp_path / "c" / "manifest.json").read_text())["image"]["files"].values()]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([*names, "manifest.json", "nvcim-image.json"])


def test_killed_mid_programming_restarts_from_a_consistent_image(tmp_path, serve):
    image = tmp_path / "chip.nvm"
    server = serve("--pty", "--image", str(image), "--sigma", "0", "--arrays", "64")
    errors = []

    def program_all():
        try:
            with driver.open(server.address, timeout=2) as dev:
                for a in range(64):
                    dev.write_cells(a, 0, 0, _targets(a))
        except driver.NvcimError as e:
            errors.append(e)

    worker = threading.Thread(target=program_all)
    worker.start()
    manifest = image / "manifest.json"
    poll_until(lambda: manifest.exists() and json.loads(manifest.read_text())["image"]["generation"] >= 6,
               "six image generations committed")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    worker.join(timeout=60)
    assert errors, "the server was killed before programming finished"

    restarted = serve("--pty", "--image", str(image))
    with driver.open(restarted.address) as dev:
        done = [a for a in range(64) if dev.read_cells(a, 0, 0, 256, 256).any()]
        assert len(done) >= 5 and done == list(range(len(done)))  # a prefix of the writes
        for a in done:  # each one whole, never torn
            assert np.array_equal(dev.read_cells(a, 0, 0, 256, 256), _targets(a))


# -- the image owns its directory, checks every file, and never invents or loses data ---------------------

SMALL = "arrays=8&rows=32&cols=32&buffer_size=65536&sigma=0.1&seed=3"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """An image holding a small MLP: a program and four programmed arrays (copied by each test)."""
    root = tmp_path_factory.mktemp("deployed")
    model = export_mlp(root / "m.onnx", in_features=16, hidden=24, out=4)
    with driver.load(model, device=f"emu://?image={root / 'chip'}&{SMALL}"):
        pass
    return root / "chip"


def _copy(deployed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(deployed, tmp_path / "chip"))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _manifest(image: Path) -> dict:
    return json.loads((image / "manifest.json").read_text())


def _rewrite_manifest(image: Path, edit) -> None:
    """Edit the manifest's contents and seal it again, as a tool that knows the format would."""
    outer = _manifest(image)
    edit(outer["image"])
    canonical = json.dumps(outer["image"], sort_keys=True, separators=(",", ":")).encode()
    outer["sha256"] = hashlib.sha256(canonical).hexdigest()
    (image / "manifest.json").write_text(json.dumps(outer))


def _refused(image: Path, match: str) -> None:
    """Powering up is refused with an error matching ``match``, and nothing in the directory changed."""
    before = _files(image)
    with pytest.raises(driver.LinkError, match=match):
        driver.open(f"emu://?image={image}")
    assert _files(image) == before


def test_a_directory_the_image_does_not_own_is_refused_untouched(tmp_path):
    (tmp_path / "noise.npz").write_bytes(b"the user's noise dump")
    (tmp_path / "backbone.bin").write_bytes(b"the user's weights")
    (tmp_path / "old.tmp").write_bytes(b"")
    _refused(tmp_path, "not an nvcim image .*not empty .*backbone.bin")


def test_files_beside_an_image_are_never_removed(tmp_path):
    image = tmp_path / "chip"
    with driver.open(f"emu://?image={image}&arrays=2&rows=16&cols=16") as dev:
        (image / "noise.npz").write_bytes(b"a user's file")
        (image / "array00000.bin").write_bytes(b"named like the image's, but not its pattern")
        dev.write_cells(0, 0, 0, np.ones((16, 16), np.uint8))
        dev.erase(0, 0, 0, 16, 16)
    with driver.open(f"emu://?image={image}"):
        pass
    assert (image / "noise.npz").read_bytes() == b"a user's file"
    assert (image / "array00000.bin").exists()


def test_a_new_image_goes_into_an_empty_directory_or_a_new_one(tmp_path):
    (tmp_path / "empty").mkdir()
    for image in (tmp_path / "empty", tmp_path / "new" / "chip"):
        with driver.open(f"emu://?image={image}&arrays=2&rows=16&cols=16") as dev:
            dev.write_cells(1, 0, 0, np.full((16, 16), 2, np.uint8))
        with driver.open(f"emu://?image={image}") as dev:
            assert (dev.read_cells(1, 0, 0, 16, 16, CellQuantity.TARGET) == 2).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no building directory left behind


@pytest.mark.parametrize("damage", ["deleted", "emptied", "edited"])
def test_a_missing_or_damaged_manifest_is_an_error_not_a_blank_chip(deployed, tmp_path, damage):
    image = _copy(deployed, tmp_path)
    manifest = image / "manifest.json"
    if damage == "deleted":
        manifest.unlink()
    elif damage == "emptied":
        manifest.write_bytes(b"")
    else:  # a plausible hand edit: sigma changed, checksum left alone
        manifest.write_text(manifest.read_text().replace('"sigma": 0.1', '"sigma": 0.2'))
    _refused(image, {"deleted": "manifest.json: missing", "emptied": "manifest.json: unreadable",
                     "edited": "manifest.json: damaged"}[damage])


@pytest.mark.parametrize("which", ["program", "array:2"])
def test_one_flipped_bit_in_a_stored_file_is_named(deployed, tmp_path, which):
    image = _copy(deployed, tmp_path)
    file = image / _manifest(image)["image"]["files"][which]["name"]
    stored = file.read_bytes()
    for at in range(0, len(stored), len(stored) // 60):  # 61 places spread over the file
        data = bytearray(stored)
        data[at] ^= 1 << (at % 8)
        file.write_bytes(bytes(data))
        _refused(image, f"{file.name}: damaged")


def test_a_missing_file_is_named(deployed, tmp_path):
    image = _copy(deployed, tmp_path)
    name = _manifest(image)["image"]["files"]["array:1"]["name"]
    (image / name).unlink()
    _refused(image, f"{name}: image file named by the manifest is unreadable")


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "array00001.g1.npz/../x",
                                  "program.g2.bin"])
def test_manifest_file_names_stay_inside_the_image(deployed, tmp_path, name):
    image = _copy(deployed, tmp_path)
    _rewrite_manifest(image, lambda body: body["files"]["array:1"].update(name=name))
    _refused(image, "not 'array:N' -> arrayNNNNN.gG.npz")


def test_a_sealed_manifest_that_does_not_fit_the_chip_is_named(deployed, tmp_path):
    image = _copy(deployed, tmp_path)
    _rewrite_manifest(image, lambda body: body["config"].update(rows=64))  # the arrays stored are 32x32
    _refused(image, "array0000.*does not fit the stored geometry")
    _rewrite_manifest(image, lambda body: body["config"].update(rows=32, sigma="high"))
    _refused(image, "stored chip configuration is not usable")


def test_the_intact_image_powers_up_with_its_program_and_cells(deployed, tmp_path):
    image = _copy(deployed, tmp_path)
    with driver.open(f"emu://?image={image}") as dev:
        assert len(dev.fetch_program().layers) == 2
        assert dev.read_cells(3, 0, 0, 32, 32, CellQuantity.TARGET).any()
