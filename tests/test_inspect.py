"""``nvcim inspect``: deviation heatmaps, the noise histogram, write-verify iterations per cell and a
program's tile map, with the terminal summary's numbers checked against the chip itself."""

from __future__ import annotations

import uuid

import numpy as np
from click.testing import CliRunner

from nvcim import driver
from nvcim.compiler import Target, compile_model
from nvcim.driver import CellQuantity
from nvcim.tools import inspect_chip
from nvcim.tools.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _ok(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_cells_pictures_and_summary(tmp_path):
    url = f"emu://inspect-{uuid.uuid4().hex[:8]}?arrays=3&rows=32&cols=48&seed=2&sigma=0.3"
    targets = np.random.default_rng(0).integers(0, 4, (32, 48))
    with driver.open(url) as dev:
        dev.write_cells(0, 0, 0, targets)                       # open loop
        dev.write_cells(1, 0, 0, targets[:16], verify=True)     # verified: small deviations
        g = dev.read_cells(0, 0, 0, 32, 48)                     # the reference, read here
        noise = np.concatenate([dev.read_cells(a, 0, 0, 32, 48, CellQuantity.NOISE).ravel() for a in (0, 1)])
    out = _ok("inspect", "cells", "--device", url, "--arrays", "0,1,2", "-o", tmp_path)
    lines = out.splitlines()
    assert lines[0] == "chip 0x4E564331: GAUSSIAN, sigma 0.300, seed 2; rows 0..31, cols 0..47"
    a0, a1, a2 = lines[1:4]
    assert a0.split()[:5] == ["array", "0:", "1536", "cells", "programmed,"]
    assert f"deviation std {((g - targets) / 3).std():.4f}" in a0
    assert a1.split()[2] == "768" and a2.split()[2] == "0"
    verified_max = float(a1.split("max |")[1].split("|")[0])
    assert verified_max <= 0.06 + 1e-6        # within VERIFY_TOL of g_max
    pulsed = noise[noise != 0] / 3
    assert f"captured noise of {pulsed.size} pulsed cells: std {pulsed.std():.4f} g_max (device model 0.3000)" in out
    for name in ("deviation.png", "noise.png"):
        assert f"wrote {tmp_path / name}" in out
        width, height = _png_size(tmp_path / name)
        assert width >= 600 and height >= 400


def test_verify_iterations_account_for_every_pulse_and_leave_one_write(tmp_path):
    settings = "arrays=1&rows=32&cols=32&seed=9&sigma=0.3"
    targets = np.random.default_rng(4).integers(0, 4, (32, 32))
    with driver.open(f"emu://?{settings}") as dev:
        hist = inspect_chip.verify_iterations(dev, 0, 0, 0, targets)
        probed = dev.read_cells(0, 0, 0, 32, 32)
        assert dev.read_register("VERIFY_MAX_ITER") == 16 and dev.read_register("SEED") == 9
    assert hist.exact and hist.counts.sum() + hist.never == 1024
    assert 0.9 < hist.mean < 1.4           # about 2.1 write pulses a cell at sigma 0.3 (docs/device-model.md)
    with driver.open(f"emu://?{settings}") as ref:   # one plain write-verify from the same seed
        ref.write_register("SEED", 9)
        stats = ref.write_cells(0, 0, 0, targets, verify=True)
        np.testing.assert_array_equal(probed, ref.read_cells(0, 0, 0, 32, 32))
    assert hist.corrective_pulses == stats.write_pulses - stats.cells
    out = _ok("inspect", "verify", "--device", f"emu://?{settings}", "--region", "0,0,32,32", "--targets", 4,
              "-o", tmp_path)
    assert f"1024 cells, {hist.corrective_pulses} corrective pulses" in out
    assert "  ".join(f"{j}:{c}" for j, c in enumerate(hist.counts)) in out
    assert _png_size(tmp_path / "verify_iterations.png")[0] >= 600


def test_program_tile_map_and_summary(tmp_path, mlp_path):
    program = compile_model(mlp_path, Target(arrays=16, rows=128, cols=128))
    path = tmp_path / "mlp.bin"
    path.write_bytes(program.to_bytes())
    out = _ok("inspect", "program", path, "-o", tmp_path)
    # the MLP is 64x300 and 300x10; every weight takes 8/2 = 4 cells on each of the two sign sides
    layer1, layer2 = 2 * 64 * 300 * 4, 2 * 300 * 10 * 4
    assert out.splitlines()[0].startswith("mlp.bin: 2 crossbar layers on ")
    assert f"; {layer1 + layer2} cells" in out
    assert f"{layer1} cells" in out.splitlines()[1] and f"{layer2} cells" in out.splitlines()[2]
    owner, usage = inspect_chip.tile_usage(program)
    assert np.count_nonzero(owner) == layer1 + layer2  # no two tiles overlap
    assert _png_size(tmp_path / "tiles.png")[0] >= 600


def test_bad_region_and_program_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "cells", "--device", "emu://?arrays=1&rows=8&cols=8",
                                  "--region", "0,0,8", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "expected ROW,COL,ROWS,COLS" in result.output
    (tmp_path / "junk.bin").write_bytes(b"not a program")
    result = runner.invoke(main, ["inspect", "program", str(tmp_path / "junk.bin"), "-o", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.startswith("Error:")


def test_cells_default_to_the_arrays_of_the_loaded_program(mlp_path):
    url = f"emu://inspect-{uuid.uuid4().hex[:8]}?arrays=4"
    with driver.open(url) as dev:
        assert inspect_chip.program_arrays(dev) == []   # nothing loaded: the command shows array 0
    with driver.load(mlp_path, device=url) as sess:
        used = sorted({t.array for layer in sess.program.layers for t in layer.tiles})
        assert inspect_chip.program_arrays(sess.device) == used
