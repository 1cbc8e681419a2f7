"""The whole TSB deployment flow on one or more chips, with the summary table.

train backbone (noise injection, early stop) -> export ONNX -> deploy open loop on a chip
-> fetch its noise -> train the TSB on that noise -> export the TSB model -> compile
incrementally and write only the TSB cells with write-verify (proving the backbone cells
unchanged) -> accuracy on the chip itself and over simulated chips.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nvcim import driver
from nvcim.firmware_emu.contract.device import DeviceSettings
from nvcim.firmware_emu.contract.variation import VariationMode

from . import datasets
from .chip import (
    FlowError,
    NoiseDump,
    chip_accuracy,
    chip_settings,
    deploy_backbone,
    fetch_noise,
    flash_tsb,
    program_for,
    settings_url,
)
from .evaluate import MonteCarlo, accuracy, monte_carlo, quantized_params
from .models import DEFAULT_IMAGE, count_weights
from .onnx_io import export, load_deploy
from .train import TrainConfig, save_checkpoint, train_backbone
from .tsb import TSBConfig, fixed_backbone, load_for_training, train_tsb


@dataclass
class FlowConfig:
    workdir: Path = Path("out/tsb")
    data: str = "digits"
    image: int | None = None
    sigma: float = 0.3
    device_model: str = "GAUSSIAN"
    chip_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    device: str | None = None          # one chip given by URL instead of fresh emulated chips per seed
    draws: int = 200                   # Monte Carlo chips
    age_s: int = 0                     # also measure the reflashed chip after this many seconds of drift (0: not)
    train: TrainConfig = field(default_factory=TrainConfig)
    tsb: TSBConfig = field(default_factory=TSBConfig)


@dataclass
class ChipRow:
    seed: int | str
    deployed: float
    tsb: float
    tsb_mc: MonteCarlo
    verified_fraction: float
    tsb_pulses: int
    full_pulses: int
    tsb_busy_ns: int
    full_busy_ns: int
    tsb_seconds: float
    identical: bool
    backbone_cells: int
    deploy_pulses: int = 0             # the open-loop deploy before the TSB: part of the method's cost
    aged: float | None = None          # with TSB, after cfg.age_s seconds of drift


def chip_url(cfg: FlowConfig, seed: int) -> str:
    """A fresh emulated chip per seed, kept as a non-volatile image in the work dir."""
    image = cfg.workdir / f"chip-seed{seed}"
    if image.exists():
        shutil.rmtree(image)  # a rerun starts from the same fresh chip: same seed, same result
    return settings_url(f"emu://?image={image}", sigma=cfg.sigma, seed=seed, model=cfg.device_model)


def run_flow(cfg: FlowConfig, echo: Callable[[str], None] = print, progress: bool | None = None) -> dict:
    """Run the flow on every chip seed and return the summary (also written to workdir/summary.json)."""
    progress = sys.stderr.isatty() if progress is None else progress
    wd = cfg.workdir
    wd.mkdir(parents=True, exist_ok=True)
    image = cfg.image or DEFAULT_IMAGE[cfg.train.arch]
    data = datasets.load(cfg.data, image_size=image)
    cfg.train.sigma_eval = cfg.sigma
    cfg.train.device_model = cfg.device_model
    echo(f"data: {data.name}, {len(data.x_train)} training / {len(data.x_test)} test images of "
         f"{'x'.join(map(str, data.image_shape))}")

    # 1. backbone
    def quiet(_line: str) -> None:
        """The backbone's epoch lines stay out of the flow's output."""
    trained = train_backbone(data, cfg.train, checkpoint_dir=wd / "checkpoints", log=quiet, progress=progress)
    plan = cfg.train.epochs
    save_checkpoint(trained.model, wd / "backbone.pt", cfg.train, trained.history[-1])
    backbone_onnx = export(trained.model, wd / "backbone.onnx", role="backbone")
    deploy_model, _ = load_deploy(backbone_onnx)
    ideal = accuracy(deploy_model, data.x_test, data.y_test, quantized_params(deploy_model))
    b_weights, _ = count_weights(deploy_model)
    echo(f"backbone {cfg.train.arch} (width {cfg.train.width}): {b_weights} crossbar weights, trained "
         f"{trained.epochs_run} of a {plan}-epoch plan with noise injection sigma={cfg.train.sigma_train} in "
         f"{trained.seconds:.1f} s -> {backbone_onnx}; ideal (8-bit) test accuracy {ideal:.2%}")
    nm = DeviceSettings(cfg.sigma, cfg.device_model)
    t0 = time.perf_counter()
    deployed_mc = monte_carlo(deploy_model, data.x_test, data.y_test, nm, draws=cfg.draws, seed=0)
    echo(f"deployed backbone over {cfg.draws} simulated chips (sigma={cfg.sigma}): {deployed_mc} "
         f"[{time.perf_counter() - t0:.1f} s]")

    rows: list[ChipRow] = []
    seeds = cfg.chip_seeds if cfg.device is None else ("given",)
    for seed in seeds:
        url = cfg.device if cfg.device is not None else chip_url(cfg, seed)
        tag = f"seed{seed}" if cfg.device is None else "device"
        with driver.open(url) as dev:
            rows.append(_one_chip(cfg, dev, tag, seed, data, backbone_onnx, echo, progress))

    summary = _summary(cfg, data, ideal, deployed_mc, trained, b_weights, rows)
    for line in summary_table(summary):
        echo(line)
    (wd / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _one_chip(cfg: FlowConfig, dev: driver.Device, tag: str, seed, data: datasets.Split, backbone_onnx: Path,
              echo: Callable[[str], None], progress: bool) -> ChipRow:
    wd = cfg.workdir
    program, cost = deploy_backbone(dev, backbone_onnx)
    settings = chip_settings(dev)
    deployed = chip_accuracy(dev, program, data.x_test, data.y_test)
    dump = fetch_noise(dev, backbone_onnx)
    noise_path = dump.save(wd / f"noise-{tag}.npz")
    model, fixed, dump = load_for_training(backbone_onnx, noise_path, cfg.tsb.c)
    tsb_cfg = TSBConfig(**{**asdict(cfg.tsb), "seed": cfg.tsb.seed})
    trained = train_tsb(model, fixed, data, tsb_cfg, log=lambda s: None, progress=progress)
    tsb_onnx = export(model, wd / f"tsb-{tag}.onnx", role="tsb",
                      extra=dict(backbone_fingerprint=dump.model_fingerprint, noise_digest=dump.digest()))
    tsb_program, report = flash_tsb(dev, backbone_onnx, tsb_onnx, dump)
    with_tsb = chip_accuracy(dev, tsb_program, data.x_test, data.y_test)
    aged = None
    if cfg.age_s:
        dev.advance_time(cfg.age_s)
        aged = chip_accuracy(dev, tsb_program, data.x_test, data.y_test)
    mc = monte_carlo(model, data.x_test, data.y_test, None, draws=cfg.draws, seed=1, fixed=fixed,
                     tsb=DeviceSettings(cfg.tsb.sigma_verified))
    echo(f"chip {tag} (sigma={settings['sigma']:.3f}, seed {settings['seed']}): deployed {cost.cells} cells open loop; "
         f"accuracy {deployed:.2%} -> with TSB {with_tsb:.2%} (TSB trained in {trained.seconds:.1f} s; "
         f"{cost.write_pulses} open-loop + {report.cost.write_pulses} TSB = "
         f"{cost.write_pulses + report.cost.write_pulses} pulses vs {report.full_verify.write_pulses} "
         f"for a full write-verify; "
         f"{report.backbone_cells} backbone cells bit-identical)"
         + (f"; after {format_age(cfg.age_s)} of drift {aged:.2%}" if aged is not None else ""))
    return ChipRow(seed, deployed, with_tsb, mc, report.verified_fraction, report.cost.write_pulses,
                   report.full_verify.write_pulses, report.cost.busy_ns, report.full_verify.busy_ns,
                   trained.seconds, report.identical, report.backbone_cells, cost.write_pulses, aged)


def _summary(cfg: FlowConfig, data, ideal: float, deployed_mc: MonteCarlo, trained, b_weights: int,
             rows: list[ChipRow]) -> dict:
    gaps_d = np.array([ideal - r.deployed for r in rows])
    gaps_t = np.array([ideal - r.tsb for r in rows])
    return dict(
        model=cfg.train.arch, width=cfg.train.width, data=data.name, sigma=cfg.sigma, device_model=cfg.device_model,
        tsb_c=cfg.tsb.c, ideal=ideal, backbone_weights=b_weights, age_s=cfg.age_s,
        backbone_seconds=trained.seconds, backbone_epochs=trained.epochs_run, plan_epochs=cfg.train.epochs,
        deployed_mc=dict(mean=deployed_mc.mean, ci95=deployed_mc.ci95, spread95=deployed_mc.spread95,
                         draws=len(deployed_mc.accuracies)),
        chips=[dict(seed=r.seed, deployed=r.deployed, tsb=r.tsb, gap_deployed=ideal - r.deployed, gap_tsb=ideal - r.tsb,
                    gap_ratio=_ratio(ideal - r.tsb, ideal - r.deployed),
                    tsb_mc=dict(mean=r.tsb_mc.mean, ci95=r.tsb_mc.ci95, spread95=r.tsb_mc.spread95),
                    verified_fraction=r.verified_fraction, tsb_pulses=r.tsb_pulses, deploy_pulses=r.deploy_pulses,
                    total_pulses=r.deploy_pulses + r.tsb_pulses, full_verify_pulses=r.full_pulses,
                    tsb_busy_ns=r.tsb_busy_ns, full_verify_busy_ns=r.full_busy_ns, tsb_seconds=r.tsb_seconds,
                    backbone_identical=r.identical, backbone_cells=r.backbone_cells, tsb_aged=r.aged) for r in rows],
        mean_gap_deployed=float(gaps_d.mean()), mean_gap_tsb=float(gaps_t.mean()),
        gap_ratio=_ratio(float(gaps_t.mean()), float(gaps_d.mean())),
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summary_table(s: dict) -> list[str]:
    """The table the flow prints: per chip, then the mean over chips."""
    lines = ["", f"TSB flow: {s['model']} (width {s['width']}) on {s['data']}, chips sigma={s['sigma']} "
                 f"{s['device_model']}, ideal (8-bit, sigma=0) accuracy {s['ideal']:.2%}",
             f"{'chip':>6} {'ideal':>7} {'deployed':>9} {'with TSB':>9} {'TSB MC (95% CI)':>22} {'gap ratio':>9} "
             f"{'verified':>9} {'pulses (deploy+TSB)':>19} {'full WV':>8} {'TSB train':>9} {'backbone':>9}"]
    for c in s["chips"]:
        lo, hi = c["tsb_mc"]["ci95"]
        lines.append(f"{c['seed']:>6} {s['ideal']:>7.2%} {c['deployed']:>9.2%} {c['tsb']:>9.2%} "
                     f"{c['tsb_mc']['mean']:>8.2%} ({lo:.1%}..{hi:.1%}) {c['gap_ratio']:>9.3f} "
                     f"{c['verified_fraction']:>9.2%} {c['deploy_pulses']:>8}+{c['tsb_pulses']:<10} "
                     f"{c['full_verify_pulses']:>8} "
                     f"{c['tsb_seconds']:>8.1f}s {'identical' if c['backbone_identical'] else 'CHANGED':>9}")
    chips = s["chips"]
    mean = lambda k: float(np.mean([c[k] for c in chips]))  # noqa: E731
    lines.append(f"{'mean':>6} {s['ideal']:>7.2%} {mean('deployed'):>9.2%} {mean('tsb'):>9.2%} "
                 f"{float(np.mean([c['tsb_mc']['mean'] for c in chips])):>8.2%} {'':>16} {s['gap_ratio']:>9.3f} "
                 f"{mean('verified_fraction'):>9.2%} {mean('deploy_pulses'):>8.0f}+{mean('tsb_pulses'):<10.0f} "
                 f"{mean('full_verify_pulses'):>8.0f} "
                 f"{mean('tsb_seconds'):>8.1f}s")
    d = s["deployed_mc"]
    lines += ["",
              f"accuracy gap (ideal - on chip), mean over {len(chips)} chip(s): deployed backbone "
              f"{s['mean_gap_deployed']:.2%}, with TSB {s['mean_gap_tsb']:.2%}: gap ratio {s['gap_ratio']:.3f} "
              f"({1 / s['gap_ratio'] if s['gap_ratio'] > 0 else float('inf'):.1f}x smaller)",
              f"write pulses in all: {mean('total_pulses'):,.0f} per chip (open-loop deploy "
              f"{mean('deploy_pulses'):,.0f} + TSB {mean('tsb_pulses'):,.0f}) against "
              f"{mean('full_verify_pulses'):,.0f} for a full write-verify "
              f"({mean('full_verify_pulses') / mean('total_pulses'):.2f}x)",
              f"deployed backbone over {d['draws']} simulated chips: {d['mean']:.2%} "
              f"(95% CI {d['ci95'][0]:.2%}..{d['ci95'][1]:.2%}; "
              f"95% of chips in {d['spread95'][0]:.1%}..{d['spread95'][1]:.1%})",
              f"training time: backbone {s['backbone_seconds']:.1f} s "
              f"({s['backbone_epochs']} of a {s['plan_epochs']}-epoch "
              f"plan) + TSB {mean('tsb_seconds'):.1f} s per chip"]
    if s.get("age_s"):
        lines.append(f"with TSB after {format_age(s['age_s'])} of drift ({s['device_model']}): "
                     + ", ".join(f"chip {c['seed']} {c['tsb_aged']:.2%}" for c in chips)
                     + f"; mean {mean('tsb_aged'):.2%} (was {mean('tsb'):.2%})")
    return lines


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_age(text: str) -> int:
    """Seconds of a time span written as a number with an optional unit: 3600, 90s, 30m, 12h, 1d, 2w, 10y."""
    t = text.strip().lower()
    unit = AGE_UNITS.get(t[-1:], None)
    number = t[:-1] if unit is not None else t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"age {text!r}: expected a number of seconds or one with a unit "
                         f"({', '.join(AGE_UNITS)}), e.g. 1d") from None
    if not 0 <= value * (unit or 1) < 2 ** 32:
        raise ValueError(f"age {text!r}: must be >= 0 and under 2^32 s (136 years)")
    return round(value * (unit or 1))


def format_age(seconds: int) -> str:
    """A time span in its largest whole unit (1d, 10y, 90s)."""
    for unit, size in sorted(AGE_UNITS.items(), key=lambda u: -u[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def evaluate_model(model_path: Path, url: str, data: str, noise_path: Path | None, draws: int,
                   sigma: float | None, sigma_verified: float, chip: bool = True,
                   echo: Callable[[str], None] = print, age_s: int = 0) -> dict:
    """Ideal, on-chip and Monte Carlo accuracy of a backbone or TSB model (``nvcim eval``).

    ``age_s``: first let the chip's retention clock run this many seconds, so the on-chip
    accuracy is the one after that much drift (the chip keeps the later clock).
    """
    net, meta = load_deploy(model_path)
    split = datasets.load(data, image_size=meta["image"])
    x, y = split.x_test, split.y_test
    out = dict(ideal=accuracy(net, x, y, quantized_params(net)))
    echo(f"{model_path} ({meta['arch']}, {meta['role']}) on {len(x)} {split.name} test images: "
         f"ideal (8-bit, sigma=0) {out['ideal']:.2%}")
    settings = None
    if chip:
        with driver.open(url) as dev:
            program = program_for(dev, model_path)
            if age_s:
                dev.advance_time(age_s)
            out["chip"] = chip_accuracy(dev, program, x, y)
            settings = chip_settings(dev)
        when = f", {format_age(age_s)} later: clock {settings['clock']} s" if age_s else ""
        echo(f"on the chip {url} (sigma={settings['sigma']:.3f}, seed {settings['seed']}{when}): {out['chip']:.2%}")
    if draws > 0:
        if meta["role"] == "tsb":
            if noise_path is None:
                raise FlowError("a TSB model's Monte Carlo run holds the backbone at the chip's noise: "
                                "pass the noise file it was trained on (--noise noise.npz)")
            dump = NoiseDump.load(noise_path)
            if dump.model_fingerprint != meta.get("backbone_fingerprint"):
                raise FlowError(f"noise file {noise_path} was captured from another model than the backbone of "
                                f"{model_path}")
            fixed = fixed_backbone(net, model_path, dump)
            mc = monte_carlo(net, x, y, None, draws=draws, fixed=fixed, tsb=DeviceSettings(sigma_verified))
            what = f"backbone fixed at chip seed {dump.chip['seed']}'s noise, TSB sigma={sigma_verified}"
        else:
            sig = sigma if sigma is not None else (settings["sigma"] if settings else 0.3)
            model = settings["device_model"] if settings else "GAUSSIAN"
            variation = VariationMode.CELL_STATE if settings and settings["variation"] == "cell" else \
                VariationMode.WEIGHT_MAGNITUDE
            mc = monte_carlo(net, x, y, DeviceSettings(sig, model, variation=variation), draws=draws)
            what = f"sigma={sig:.3f} {model}"
        out["mc"] = dict(mean=mc.mean, ci95=mc.ci95, spread95=mc.spread95, draws=draws)
        echo(f"over {draws} simulated chips ({what}{', at programming time: no drift' if age_s else ''}): {mc}")
    return out
