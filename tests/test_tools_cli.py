"""The ``nvcim`` TSB commands, step by step on a chip image (each command powers the chip up anew), and in one go."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nvcim.tools.cli import CHIP_IMAGE, device_url, main
from nvcim.tools.evaluate import monte_carlo


def _ok(runner, args):
    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_step_by_step_on_a_chip_image(tmp_path):
    runner = CliRunner()
    chip, other = f"emu://?image={tmp_path / 'chip'}", f"emu://?image={tmp_path / 'other'}"
    bb, tsb, noise = tmp_path / "backbone.onnx", tmp_path / "tsb.onnx", tmp_path / "noise.npz"
    out = _ok(runner, ["train", "--epochs", 2, "--stop-fraction", 1, "-o", bb])
    assert "epoch   2/2" in out and bb.is_file() and (tmp_path / "checkpoints" / "backbone_e002.pt").is_file()
    out = _ok(runner, ["deploy", bb, "--device", chip, "--sigma", 0.3, "--seed", 3])
    assert "seed 3" in out and "write" in out
    out = _ok(runner, ["noise", "fetch", bb, "--device", chip, "-o", noise])
    assert "noise of 5395 weights in 3 layers from chip seed 3" in out
    out = _ok(runner, ["tsb", "train", bb, "--noise", noise, "--epochs", 1, "-o", tsb])
    assert "TSB c=5: 25 weights (0.46% of 5420)" in out and "TSB epoch  1/1" in out
    out = _ok(runner, ["tsb", "flash", bb, tsb, "--noise", noise, "--device", chip])
    assert "25 weights written with write-verify = 0.46%" in out and "bit-identical after the reflash" in out
    out = _ok(runner, ["eval", tsb, "--noise", noise, "--device", chip, "--draws", 4])
    assert "on the chip" in out and "over 4 simulated chips" in out

    # a noise file from another chip, and a TSB Monte Carlo run without the backbone's noise
    _ok(runner, ["deploy", bb, "--device", other, "--sigma", 0.3, "--seed", 4])
    _ok(runner, ["noise", "fetch", bb, "--device", other, "-o", tmp_path / "other.npz"])
    bad = runner.invoke(main, ["tsb", "flash", str(bb), str(tsb), "--noise", str(tmp_path / "other.npz"),
                               "--device", chip])
    assert bad.exit_code == 1 and "comes from another chip: unique_id=" in bad.output \
        and "seed=3 (noise file: 4)" in bad.output
    bad = runner.invoke(main, ["eval", str(tsb), "--no-chip", "--draws", 3])
    assert bad.exit_code == 1 and "pass the noise file it was trained on" in bad.output
    bad = runner.invoke(main, ["deploy", str(tmp_path / "missing.onnx"), "--device", chip])
    assert bad.exit_code == 1 and "missing.onnx" in bad.output


def test_flow_prints_the_summary_table(tmp_path):
    out = _ok(CliRunner(), ["flow", "--workdir", tmp_path, "--epochs", 2, "--stop-fraction", 1, "--seeds", "1,2",
                            "--tsb-epochs", 1, "--draws", 4, "--age", "1d"])
    assert "gap ratio" in out and "with TSB" in out and out.count("identical") >= 2
    assert "with TSB after 1d of drift (GAUSSIAN)" in out  # GAUSSIAN keeps its cells: the same accuracy
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["seed"] for c in summary["chips"]] == [1, 2]
    assert all(c["backbone_identical"] and c["verified_fraction"] < 0.005 for c in summary["chips"])
    assert summary["age_s"] == 86400 and all(c["tsb_aged"] == c["tsb"] for c in summary["chips"])
    assert (tmp_path / "chip-seed2").is_dir() and (tmp_path / "tsb-seed2.onnx").is_file()


def test_chip_commands_default_to_the_environment_then_the_flow_chip_image(monkeypatch):
    monkeypatch.delenv("NVCIM_DEVICE", raising=False)
    assert device_url(None) == CHIP_IMAGE == "emu://?image=out/tsb/chip"
    monkeypatch.setenv("NVCIM_DEVICE", "emu://?arrays=3")
    assert device_url(None) == "emu://?arrays=3"
    assert device_url("socket://127.0.0.1:5000") == "socket://127.0.0.1:5000"


def test_a_monte_carlo_of_no_chips_is_refused_by_name(tmp_path):
    """The flow and the demo report Monte Carlo columns: --draws 0 is a usage error there (eval
    takes 0 as "chip only"), not an internal error after training a backbone."""
    runner = CliRunner()
    for command in (["flow", "--workdir", tmp_path], ["demo", "--workdir", tmp_path]):
        result = runner.invoke(main, [str(a) for a in command] + ["--draws", "0"])
        assert result.exit_code == 2 and "'--draws': 0 is not in the range x>=1" in result.output
        assert not any(tmp_path.iterdir())                      # refused before anything ran
    result = runner.invoke(main, ["eval", str(tmp_path / "m.onnx"), "--draws", "-1"])
    assert result.exit_code == 2 and "'--draws': -1 is not in the range x>=0" in result.output
    with pytest.raises(ValueError, match="at least one chip, got draws=0"):
        monte_carlo(None, np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64), None, draws=0)
