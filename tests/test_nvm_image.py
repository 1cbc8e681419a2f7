"""The non-volatile image: cells, noise dump and program survive a power cycle, atomically."""

import json
import os
import signal
import threading

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
        assert [l.name for l in program.layers] == [l.name for l in sess.program.layers]
        assert np.array_equal(dev.run([batch])[0], before)


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
    names = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"].values()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([*names, "manifest.json"])


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
    poll_until(lambda: manifest.exists() and json.loads(manifest.read_text())["generation"] >= 6,
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
