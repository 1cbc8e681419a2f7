"""Smoke versions of every experiment (tiny data, one chip a point): tables, rows and plots, and the
numbers the headline is built from checked against the rows themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nvcim.tools.cli import main
from nvcim.tools.experiments import EXPERIMENTS, ExperimentConfig, run_experiment


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> ExperimentConfig:
    return ExperimentConfig.smoke(out=tmp_path_factory.mktemp("experiments"), seeds=(1,), sigmas=(0.3,), epochs=3,
                                  budgets=(0.05,), devices=("RRAM4",))


@pytest.fixture(scope="module")
def results(cfg) -> dict:
    return {name: run_experiment(name, cfg, log=lambda s: None) for name in EXPERIMENTS}


def test_every_experiment_writes_its_table_rows_and_plot(results):
    assert set(results) == {"gap-vs-sigma", "time-to-accuracy", "tsb-ablation", "write-cycles", "nft"}
    for name, r in results.items():
        png = Path(r["png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert Path(r["md"]).read_text().startswith(r["table"][0])
        assert Path(r["md"]).with_suffix(".json").is_file()
        assert r["rows"] and all(0 <= row["accuracy"] <= 1 for row in r["rows"])


def test_gap_vs_sigma_headline_is_the_best_baseline_with_pulses_in_full(results):
    r = results["gap-vs-sigma"]
    rows = r["rows"]
    h = r["headline"]
    by = {row["label"]: row for row in rows}
    baselines = ["noise injection, deployed", "retrain last layer", "retrain last layers",
                 "retrain last layer, open-loop reflash"]
    assert h["best"]["baseline"] == min(baselines, key=lambda b: by[b]["gap_ref"])
    same = ["noise injection, deployed", "retrain last layer, open-loop reflash", "U-SWIM at TSB's budget"]
    assert h["same_budget"]["baseline"] == min(same, key=lambda b: by[b]["gap_ref"])
    assert by["retrain last layer, open-loop reflash"]["verified_weights"] == 0
    tsb = by["TSB (50% backbone)"]
    assert h["pulses_tsb"] == tsb["write_pulses"] == sum(s["write_pulses"] for s in tsb["stages"].values())
    assert tsb["stages"]["deploy"]["write_pulses"] > 20 * tsb["stages"]["reflash"]["write_pulses"]
    uswim = next(row for row in rows if row["method"] == "selective")
    assert uswim["verified_weights"] == round(uswim["params"]["budget"] * uswim["total_weights"])
    assert uswim["params"]["budget"] == pytest.approx(25 / 5420, abs=1e-6)  # TSB's own share


def test_write_cycles_are_normalised_to_full_write_verify(results):
    rows = results["write-cycles"]["rows"]
    wv = [r["normalised_pulses"] for r in rows if r["label"] == "full write-verify"]
    assert np.mean(wv) == pytest.approx(1.0)
    open_loop = next(r for r in rows if r["label"] == "open loop (no verify)")
    assert 0.3 < open_loop["normalised_pulses"] < 0.7 and open_loop["normalised_verify_pulses"] == 0
    rules = {r["params"]["rule"] for r in rows if r["method"] == "selective"}
    assert rules == {"uswim", "magnitude", "random"} and {r["device_model"] for r in rows} == {"RRAM4"}


def test_time_to_accuracy_charges_tsb_its_backbone_time(results):
    rows = results["time-to-accuracy"]["rows"]
    for r in rows:
        assert r["total_seconds"] == pytest.approx(r["backbone_seconds"] + r["train_seconds"])
    tsb15 = next(r for r in rows if r["label"] == "TSB (15% backbone)")
    full = max(r["backbone_seconds"] for r in rows if r["label"] == "noise injection, deployed")
    assert tsb15["backbone_seconds"] < full


def test_experiment_command_smoke(cfg, results):
    png = cfg.out / "tsb-ablation-lenet3.png"
    png.unlink()
    out = CliRunner().invoke(main, ["experiment", "tsb-ablation", "--smoke", "--seeds", "1", "--epochs", "3",
                                    "--scheduler", "serial", "--out", str(cfg.out)])  # the fixture's backbones
    assert out.exit_code == 0, out.output
    assert "training backbone" not in out.output and "c=5, all points, separate" in out.output and png.is_file()
    bad = CliRunner().invoke(main, ["experiment", "nft", "--sigmas", "x"])
    assert bad.exit_code != 0 and "comma-separated numbers" in bad.output


def test_nft_searches_beta_as_the_paper_and_puts_a_tsb_on_the_chosen_backbones(results, cfg):
    r = results["nft"]
    rows = r["rows"]
    deployed = {}
    for row in rows:
        if row["method"] == "deployed" and row["sigma"] == cfg.sigma:
            deployed.setdefault(row["label"], []).append(row["accuracy"])
    for kind, name in (("ovf", "NFT OVF"), ("irs", "NFT IRS")):
        means = {b: np.mean(deployed[f"{name} (beta {b:g}), deployed"]) for b in cfg.betas}
        assert r["chosen_beta"][kind] == max(means, key=means.get)
        tsb = [row for row in rows if row["label"] == f"{name} (beta {r['chosen_beta'][kind]:g}) + TSB"]
        assert len(tsb) == len(cfg.seeds) and all(row["method"] == "tsb" for row in tsb)
    # each beta is its own training run: the backbones differ
    names = {row["backbone"] for row in rows if row["label"].startswith("NFT OVF")}
    assert len(names) == len(cfg.betas)
